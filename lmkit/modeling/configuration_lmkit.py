"""Configuration of the lmkit causal language model.

Self-contained (imports only transformers) so it can ship beside published weights as remote code.
"""

import math
from typing import Any

from transformers import PretrainedConfig

# Logits per chunk of the fused LM-head + cross-entropy when `loss_chunk_size` is None: 2**25 fp32 values are 128 MiB,
# at vocab 32,000 the same ~1,000 tokens a fixed chunk would take, while a small vocabulary gets whole batches.
LOSS_CHUNK_ELEMENTS = 2**25


class LMConfig(PretrainedConfig):
    r"""Shape and training knobs of an lmkit model: a Llama-architecture decoder (pre-norm RMSNorm, rotary
    embeddings, SwiGLU MLP, grouped-query attention).

    Field names are the Hugging Face canonical ones, so DeepSpeed "auto" sizing, peft and weight converters read
    them unchanged. The seed names are aliases: ``d_model`` -> ``hidden_size``, ``n_heads`` ->
    ``num_attention_heads``, ``n_layers`` -> ``num_hidden_layers``, ``d_ff`` -> ``intermediate_size`` (both for
    construction and for reading back).

    Args:
        vocab_size (`int`, defaults to 32000):
            Number of tokens in the vocabulary (rows of the embedding matrix and of the LM head).
        hidden_size (`int`, defaults to 128):
            Width of the residual stream.
        intermediate_size (`int`, *optional*):
            Width of the SwiGLU MLP. `None` means 8/3 * hidden_size rounded up to a multiple of 64, which keeps the
            MLP's parameter count close to a 4x GELU MLP.
        num_hidden_layers (`int`, defaults to 4):
            Number of decoder layers.
        num_attention_heads (`int`, defaults to 4):
            Number of query heads; must divide hidden_size, and head_dim = hidden_size / num_attention_heads must be
            even (rotary embeddings rotate pairs of channels).
        num_key_value_heads (`int`, *optional*):
            Number of key/value heads for grouped-query attention; must divide num_attention_heads. `None` means
            num_attention_heads (plain multi-head attention); 1 is multi-query attention.
        max_position_embeddings (`int`, defaults to 256):
            Longest sequence the model is meant to see; used by RoPE scaling variants and as a bound by callers.
        rope_theta (`float`, defaults to 10000.0):
            Base of the rotary embedding frequencies. Stored inside `rope_parameters`, where transformers keeps it.
        rope_parameters (`dict`, *optional*):
            The full RoPE specification in transformers' format (`{"rope_type": ..., "rope_theta": ..., ...}`), as
            written to config.json. `None` means `{"rope_type": "default", "rope_theta": rope_theta}`; any
            `rope_type` of transformers' `ROPE_INIT_FUNCTIONS` (linear, dynamic, yarn, llama3, ...) works.
        rms_norm_eps (`float`, defaults to 1e-6):
            Epsilon added to the mean square inside RMSNorm.
        tie_word_embeddings (`bool`, defaults to `True`):
            Share one matrix between the input embeddings and the LM head.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal init of embeddings and linear layers. The projections that write into
            the residual stream (`o_proj`, `down_proj`) use initializer_range / sqrt(2 * num_hidden_layers).
        attention_dropout (`float`, defaults to 0.0):
            Dropout probability on the attention weights, active in training mode only.
        loss_chunk_size (`int`, *optional*):
            A runtime setting, not part of the model: like `attn_implementation` it lives on the config object
            (set it here, as `config.loss_chunk_size = n`, or `from_pretrained(path, loss_chunk_size=n)`) and is
            not written to config.json, so a published or fine-tuned model does not inherit how one run traded
            memory for compute. When > 0 and the model computes a loss in training mode, the LM head and the fp32
            cross-entropy run fused over chunks of this many tokens, so the full (tokens, vocab) fp32 logits and
            their gradient never exist at once; the forward then returns `logits=None`. 0 computes full logits and
            a plain loss. None (the default) sizes the chunk from the vocabulary: as many tokens as fit
            `LOSS_CHUNK_ELEMENTS` (2**25) logits, 128 MiB in fp32 (1,048 tokens at vocab 32,000; 8,192 at 4,096),
            at least 256. A batch that fits in one chunk then skips the recomputation that chunking costs.
        use_cache (`bool`, defaults to `True`):
            Return the key/value cache from forward (used by `generate`).
        bos_token_id (`int`, *optional*):
            Id of the beginning-of-sequence token.
        eos_token_id (`int` or `list[int]`, *optional*):
            Id(s) of the end-of-sequence token; `generate` stops on it.
        pad_token_id (`int`, *optional*):
            Id of the padding token; its embedding row starts at zero and receives no gradient from the input side.
        kwargs:
            Passed to `PretrainedConfig` (e.g. `attn_implementation`, `dtype`).

    Example:

    ```python
    >>> config = LMConfig(d_model=64, n_heads=4, n_layers=2, num_key_value_heads=2)
    >>> config.hidden_size, config.intermediate_size, config.d_ff
    (64, 192, 192)
    ```
    """

    model_type = "lmkit"
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`), as LlamaConfig's: q/k/v and gate/up split their
    # output features (whole heads) across ranks, o_proj and down_proj split their input features and all-reduce
    # the output. transformers adds `embed_tokens` (vocabulary rows) itself; the head's plan is on LMForCausalLM.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Pipeline parallelism: each stage's (inputs, outputs), as LlamaConfig's.
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    attribute_map = {
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "n_layers": "num_hidden_layers",
        "d_ff": "intermediate_size",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 128,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        rope_parameters: dict | None = None,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        attention_dropout: float = 0.0,
        loss_chunk_size: int | None = None,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        # The seed names arrive through kwargs; resolve them before deriving defaults from the canonical fields.
        hidden_size = kwargs.pop("d_model", hidden_size)
        num_attention_heads = kwargs.pop("n_heads", num_attention_heads)
        num_hidden_layers = kwargs.pop("n_layers", num_hidden_layers)
        intermediate_size = kwargs.pop("d_ff", intermediate_size)

        if intermediate_size is None:
            intermediate_size = 64 * math.ceil(8 * hidden_size / (3 * 64))
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        rope_parameters = dict(rope_parameters or {})
        rope_parameters.setdefault("rope_type", "default")
        rope_parameters.setdefault("rope_theta", rope_theta)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters
        self.rms_norm_eps = rms_norm_eps
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.loss_chunk_size = loss_chunk_size
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self._check_fields()
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()  # to_diff_dict, to_json_string and save_pretrained all go through here
        output.pop("loss_chunk_size", None)  # a runtime setting (see the docstring), kept out of config.json
        return output

    @property
    def head_dim(self) -> int:
        """Channels per attention head (read by transformers' RoPE and cache utilities)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def loss_chunk_tokens(self) -> int:
        """Tokens per chunk of the fused LM-head + cross-entropy (0: not chunked), `loss_chunk_size` resolved."""
        if self.loss_chunk_size is not None:
            return self.loss_chunk_size
        return max(256, LOSS_CHUNK_ELEMENTS // self.vocab_size)

    def _check_fields(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                problems.append(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if problems:  # the divisibility checks below would divide by zero
            raise ValueError("Invalid LMConfig: " + "; ".join(problems))

        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"`hidden_size` {self.hidden_size} is not divisible by `num_attention_heads` {self.num_attention_heads}"
            )
        elif self.head_dim % 2:
            problems.append(
                f"`hidden_size` / `num_attention_heads` = {self.head_dim} must be even for rotary embeddings"
            )
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"`num_key_value_heads` {self.num_key_value_heads} must divide "
                f"`num_attention_heads` {self.num_attention_heads}"
            )
        if self.max_position_embeddings < 1:
            problems.append(f"`max_position_embeddings` must be >= 1, got {self.max_position_embeddings}")
        if self.rope_parameters["rope_theta"] <= 0:
            problems.append(f"`rope_theta` must be > 0, got {self.rope_parameters['rope_theta']}")
        if self.rms_norm_eps <= 0:
            problems.append(f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps}")
        if self.initializer_range <= 0:
            problems.append(f"`initializer_range` must be > 0, got {self.initializer_range}")
        if not 0.0 <= self.attention_dropout < 1.0:
            problems.append(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            problems.append(f"`loss_chunk_size` must be >= 0 (0 disables chunking), got {self.loss_chunk_size}")
        if problems:
            raise ValueError("Invalid LMConfig: " + "; ".join(problems))


__all__ = ["LMConfig"]
