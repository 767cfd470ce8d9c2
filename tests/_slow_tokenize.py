"""A recipe whose tokenizing is slow, for tests/test_preprocess.py: ``accelerate launch tests/_slow_tokenize.py
RECIPE.py ARGS...`` runs RECIPE.py with every tokenize batch of `lmkit.data` taking ``LMKIT_TEST_TOKENIZE_SLEEP``
seconds more, on whichever rank tokenizes, and every collective of the process group timing out after
``LMKIT_TEST_PG_TIMEOUT`` seconds. (A GPU run's NCCL group gets ``--ddp_timeout``; on a CPU run transformers
passes no timeout to accelerate, so gloo keeps torch's 30 minutes: this hook gives the test a GPU run's timeout.)
"""

import datetime
import os
import runpy
import sys
import time

import torch.distributed

import lmkit.data

tokenize, init_process_group = lmkit.data._tokenize_batch, torch.distributed.init_process_group


def slow_tokenize(*args, **kwargs):
    time.sleep(float(os.environ["LMKIT_TEST_TOKENIZE_SLEEP"]))
    return tokenize(*args, **kwargs)


def init_with_timeout(*args, **kwargs):
    kwargs["timeout"] = datetime.timedelta(seconds=float(os.environ["LMKIT_TEST_PG_TIMEOUT"]))
    return init_process_group(*args, **kwargs)


lmkit.data._tokenize_batch = slow_tokenize
torch.distributed.init_process_group = init_with_timeout
if __name__ == "__main__":
    recipe, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(recipe, run_name="__main__")
