"""lm_loss: corpus-level loss, perplexity and bits per byte of a causal language model.

An `evaluate` metric module that ships inside lmkit and is loaded by path, so it works offline::

    metric = evaluate.load(lmkit.evaluation.METRIC_PATH)
    metric.add_batch(nats=[12.3, 8.1], tokens=[4, 3], bytes=[17, 11])
    metric.compute()  # {"loss": ..., "perplexity": ..., "bits_per_byte": ..., "tokens": 7, "bytes": 28}

Each row is one scored span: the summed negative log-likelihood of its tokens in nats, how many tokens that is,
and how many UTF-8 bytes of text those tokens spell. Sums are taken over all rows before dividing, so the result
is the token-weighted mean whatever the batching.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """Token-weighted mean cross-entropy (nats per token), its exponential (perplexity), and bits per
UTF-8 byte = total nats / (ln 2 * total bytes), which does not depend on the tokenizer."""

_KWARGS_DESCRIPTION = """
Args:
    nats (`list[float]`): summed negative log-likelihood (natural log) of each span's tokens.
    tokens (`list[int]`): number of scored tokens in each span.
    bytes (`list[int]`): UTF-8 bytes of text spelled by each span's scored tokens.
Returns:
    loss (`float`): total nats / total tokens.
    perplexity (`float`): exp(loss).
    bits_per_byte (`float`): total nats / (ln 2 * total bytes); NaN when no bytes were scored.
    tokens (`int`), bytes (`int`): the totals.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LMLoss(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nats": datasets.Value("float64"),
                    "tokens": datasets.Value("int64"),
                    "bytes": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, nats: list[float], tokens: list[int], bytes: list[int]) -> dict[str, float]:  # noqa: A002
        total_nats, total_tokens, total_bytes = math.fsum(nats), sum(tokens), sum(bytes)
        if total_tokens == 0:
            raise ValueError("lm_loss: no tokens were scored")
        loss = total_nats / total_tokens
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bits_per_byte": total_nats / (math.log(2) * total_bytes) if total_bytes else math.nan,
            "tokens": total_tokens,
            "bytes": total_bytes,
        }
