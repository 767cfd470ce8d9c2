"""The lmkit model: a Llama-architecture causal LM whose code ships as remote code beside its weights."""

from .configuration_lmkit import LMConfig
from .modeling_lmkit import LMForCausalLM, LMModel, LMPreTrainedModel

__all__ = ["LMConfig", "LMForCausalLM", "LMModel", "LMPreTrainedModel"]
