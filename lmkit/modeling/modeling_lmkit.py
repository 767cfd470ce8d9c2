"""The lmkit causal language model: a Llama-architecture decoder.

Pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP and grouped-query attention, with the attention backend
(sdpa by default, eager, flash, flex) chosen through transformers' attention interface. Parameter names equal
transformers' ``LlamaForCausalLM`` keys one for one and no layer has a bias, so weights copy across unchanged and
peft ``target_modules`` such as ``["q_proj", "v_proj"]`` work.

The one departure from Llama is the loss: it is computed in fp32 and, in training, fused with the LM head over
chunks of tokens (see ``causal_lm_loss``). The tensor- and pipeline-parallel plans are Llama's too.

Self-contained (imports only torch and transformers) so it can ship beside published weights as remote code.
"""

import functools
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_lmkit import LMConfig

IGNORE_INDEX = -100


class LMRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, with the statistics taken in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x * rsqrt(mean(x^2) + eps). On CPU torch runs it as Llama's own ops (pow, mean, add, rsqrt,
        # mul), so CPU parity with Llama is exact; CUDA fuses them into one kernel.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LMRotaryEmbedding(nn.Module):
    """Turns positions into the (cos, sin) tables that rotate query/key channel pairs.

    `inv_freq` is a non-persistent buffer; the attributes `rope_type`, `original_inv_freq` and
    `compute_default_rope_parameters` follow transformers' protocol, so `from_pretrained` re-creates the buffer and
    the scaled RoPE variants (`dynamic_rope_update`, `ROPE_INIT_FUNCTIONS`) work unchanged.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        if self.rope_type == "default":
            rope_init_fn: Callable = self.compute_default_rope_parameters
        else:
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: LMConfig, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        """theta^(-2i / head_dim) for i < head_dim / 2, as in RoFormer; no attention scaling."""
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim  # (head_dim / 2,)
        return 1.0 / (config.rope_parameters["rope_theta"] ** exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every channel pair of `x` (B, heads, T, head_dim) by its position's angle; cos/sin are (B, T, head_dim)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_heads, S, head_dim) -> (B, n_kv_heads * n_rep, S, head_dim), each K/V head repeated for its group.

    Expand + reshape exactly as transformers' Llama does (and the input itself when n_rep is 1): the eager matmuls
    then see the same memory layout as Llama's and take the same CPU kernel, so the two agree bit for bit.
    `repeat_interleave` gives the same values in a fresh contiguous copy, which some CPUs multiply through another
    kernel (1e-7 apart on AMD EPYC).
    """
    if n_rep == 1:
        return x
    B, n_kv_heads, S, head_dim = x.shape
    return x[:, :, None].expand(B, n_kv_heads, n_rep, S, head_dim).reshape(B, n_kv_heads * n_rep, S, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v in plain torch; the reference the fused backends must match."""
    key = repeat_kv(key, module.num_key_value_groups)  # (B, n_heads, S, head_dim)
    value = repeat_kv(value, module.num_key_value_groups)  # (B, n_heads, S, head_dim)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, n_heads, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask  # additive: 0 where allowed, dtype-min where masked
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, n_heads, T, S)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, n_heads, head_dim)
    return output, weights


class LMAttention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings; `num_key_value_groups` query heads share a K/V head."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        q_dim = config.num_attention_heads * self.head_dim
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)
        self.o_proj.is_residual_projection = True  # depth-scaled init, see LMPreTrainedModel._init_weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)

        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv_heads, S, head_dim), S = past + T

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )  # output: (B, T, n_heads, head_dim)
        return self.o_proj(output.reshape(B, T, -1)), weights  # (B, T, hidden)


class LMMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.is_residual_projection = True  # depth-scaled init, see LMPreTrainedModel._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, hidden)


class LMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LMAttention(config, layer_idx)
        self.post_attention_layernorm = LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LMMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, cache, **kwargs)
        h = x + attn_out  # (B, T, hidden)
        return h + self.mlp(self.post_attention_layernorm(h))  # (B, T, hidden)


class LMPreTrainedModel(PreTrainedModel):
    config_class = LMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LMDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": LMDecoderLayer, "attentions": LMAttention}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' save; a remote-code model with a head also names its backbone under `AutoModel` in auto_map.

        transformers writes only the saved class into auto_map; adding the backbone (as Hub remote-code models do)
        lets `AutoModel.from_pretrained(folder, trust_remote_code=True)` load the decoder of a causal-LM folder.
        """
        if self.is_remote_code() and self.base_model is not self:
            base = type(self.base_model)
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{base.__module__.rsplit('.', 1)[-1]}.{base.__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' defaults: N(0, initializer_range) for linears and embeddings, ones for norms, RoPE buffers.
        # The projections that add into the residual stream (o_proj, down_proj) then get GPT-2's scaled init, std /
        # sqrt(2 * layers), so the residual stream's variance at init does not grow with depth. They are tagged
        # rather than found through their parent module because transformers skips parameter-less modules
        # (LMAttention, LMMLP) when initializing remote code.
        super()._init_weights(module)
        if getattr(module, "is_residual_projection", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)


class LMModel(LMPreTrainedModel):
    """Embeddings, the decoder stack and the final norm; returns the last hidden states (and the KV cache)."""

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, hidden)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # Causal and padding-aware, in the form the configured attention backend wants (None lets sdpa use is_causal).
        # Only caller-given positions can mark packed documents (a restart at 0 starts a new document); default ones
        # are left out, which under torch.compile spares every attention layer a per-token document comparison.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            T = inputs_embeds.shape[1]
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]  # (1, T)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: (B, T, head_dim)

        hidden_states = inputs_embeds
        for layer in self.layers:
            # position_ids travel on to the attention backend: flash attention reads packed-sequence boundaries there.
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                cache=cache,
                use_cache=use_cache,
                position_ids=position_ids,
                **kwargs,
            )  # (B, T, hidden)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


def fp32_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (n, vocab) against targets (n,), summed over non-ignored targets, in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def head_cross_entropy_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32_cross_entropy_sum of lm_head(hidden); the head is called as a module, so its hooks (peft, FSDP,
    DeepSpeed ZeRO-3, tensor parallelism) run as usual."""
    return fp32_cross_entropy_sum(lm_head(hidden), targets)  # lm_head: (n, hidden) -> (n, vocab)


def causal_lm_loss(
    lm_head: nn.Module,
    hidden_states: torch.Tensor,
    shift_labels: torch.Tensor,
    logits: torch.Tensor | None = None,
    chunk_size: int = 0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of lm_head(hidden_states) (B, T, hidden) against shift_labels (B, T), in fp32.

    The mean over non-ignored targets, or their sum divided by `num_items_in_batch` when given (gradient
    accumulation). With `logits` (B, T, vocab) the head is not run again and the fp32 upcast goes `chunk_size`
    tokens at a time (0: all at once). Without them the head and the cross-entropy run fused over chunks of
    `chunk_size` tokens, each under non-reentrant activation checkpointing: its forward keeps only the chunk's
    inputs (views into `hidden_states`) and the backward recomputes its logits, so at most one chunk's logits, fp32
    logits and logit gradient are alive at once, and the (tokens, vocab) logits never exist. The price is one extra
    LM-head matmul in the backward, paid only when there is more than one chunk.
    """
    targets = shift_labels.to(hidden_states.device).reshape(-1)  # (B*T,)
    if logits is None:
        inputs = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, hidden)
        chunk_loss = functools.partial(head_cross_entropy_sum, lm_head)
    else:
        if logits.shape[:2] != shift_labels.shape:
            raise ValueError(
                f"Logits of shape {tuple(logits.shape[:2])} do not match targets of shape "
                f"{tuple(shift_labels.shape)}: pass logits_to_keep=0 when computing a loss."
            )
        inputs = logits.reshape(-1, logits.shape[-1])  # (B*T, vocab)
        chunk_loss = fp32_cross_entropy_sum
    chunk_size = chunk_size or inputs.shape[0]
    # A single fused chunk's logits are the only ones alive anyway: it skips the recompute.
    recompute = logits is None and inputs.shape[0] > chunk_size
    loss_sum = inputs.new_zeros((), dtype=torch.float32)
    for x, t in zip(inputs.split(chunk_size), targets.split(chunk_size), strict=True):
        loss_sum = loss_sum + (checkpoint(chunk_loss, x, t, use_reentrant=False) if recompute else chunk_loss(x, t))

    if num_items_in_batch is None:
        return loss_sum / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


class LMForCausalLM(LMPreTrainedModel, GenerationMixin):
    """LMModel plus the LM head, the causal-LM loss and `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Tensor / pipeline parallelism of the head, as LlamaForCausalLM's (the decoder's plans are on LMConfig): the
    # head splits the vocabulary across ranks and gathers full logits.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.model = LMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""Run the decoder; with targets, also return the mean next-token cross-entropy.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): token ids (or pass `inputs_embeds` `(B, T, hidden)`).
            attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*): 1 for real tokens, 0 for padding.
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): defaults to past_length + arange(T).
                In a packed row (several documents, no attention_mask, no cache), positions restarting at 0 mark
                the document starts, and attention stays within each document.
            cache (`Cache`, *optional*): key/value cache from an earlier call. transformers 5 names it `cache`
                (generate passes it so); its old name `past_key_values` is still accepted, with a FutureWarning,
                exactly as by transformers' Llama (peft's prefix tuning still passes it).
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): the Hugging Face convention, unshifted:
                the model shifts them, so `model(input_ids=x, labels=x)` is the usual next-token loss.
            use_cache (`bool`, *optional*): return the cache; defaults to `config.use_cache` in eval mode and to
                False in training mode.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0): only compute logits for the last n positions
                (0 = all), or for the given indices. Does not affect the loss when it is fused.
            kwargs: the loss keywords, read here and not passed on:
                - `shift_labels` (`torch.LongTensor` of shape `(B, T)`): targets already shifted, aligned with the
                  input positions (`shift_labels[:, t]` is the token that should follow position t), as lmkit's
                  collator produces them; used as given. Wins over `labels` when both are passed. It is a keyword
                  rather than a named parameter, as in transformers' Llama: the Trainer treats every named
                  `*label*` parameter as a label column and would then want both in every batch.
                - `num_items_in_batch` (passed by the Trainer under gradient accumulation): the loss is then the
                  sum of token losses divided by it instead of the mean over this batch's targets.
                Everything else goes on to the attention backend (e.g. `output_attentions`, flash-attention varlen
                arguments).

        Targets equal to -100 are ignored. The cross-entropy is always computed in fp32. In training mode with
        `config.loss_chunk_tokens > 0` the LM head and the cross-entropy run fused over chunks of tokens (see
        `causal_lm_loss`), so the full `(B*T, vocab)` logits never exist: the output then carries `logits=None`. In
        eval mode, without targets, or with `loss_chunk_size=0`, the logits are returned.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if use_cache is None and self.training:
            # Training never reads the cache, and without one create_causal_mask can split packed sequences into
            # separate documents by their position_ids (it only looks for them when no cache is passed).
            use_cache = False
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, hidden)

        if shift_labels is None and labels is not None:
            # Position t is scored against token t + 1; the last position has no target.
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        chunk_size = self.config.loss_chunk_tokens
        fused = shift_labels is not None and self.training and chunk_size > 0
        logits = None
        if not fused:
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))  # (B, T_keep, vocab)
        loss = None
        if shift_labels is not None:
            loss = causal_lm_loss(self.lm_head, hidden_states, shift_labels, logits, chunk_size, num_items_in_batch)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["LMForCausalLM", "LMModel", "LMPreTrainedModel"]
