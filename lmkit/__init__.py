"""lmkit: pretrain and fine-tune causal language models on the Hugging Face stack.

Importing lmkit registers the lmkit model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(path)`` loads an lmkit checkpoint.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from lmkit.modeling import LMConfig, LMForCausalLM

__version__ = "0.1.0"

AutoConfig.register(LMConfig.model_type, LMConfig, exist_ok=True)
AutoModelForCausalLM.register(LMConfig, LMForCausalLM, exist_ok=True)

__all__ = ["LMConfig", "LMForCausalLM", "__version__"]
