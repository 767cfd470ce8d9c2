"""User-facing errors and the wrapper that turns them into a one-line message and a non-zero exit."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Exit status for every input error a user can fix (argparse uses 2 for usage errors too).
USER_ERROR_EXIT = 2


class LMKitError(Exception):
    """A problem with what the user gave us (a path, a file, a flag). The message names the field or file."""


def main_entry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a recipe's ``main``: an `LMKitError` becomes ``lmkit: error: <message>`` on stderr and exit 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LMKitError as err:
            message = " ".join(str(err).split())  # one line, whatever the message was built from
            print(f"lmkit: error: {message}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT)

    return wrapper
