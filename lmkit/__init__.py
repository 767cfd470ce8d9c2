"""lmkit: pretrain and fine-tune causal language models on the Hugging Face stack.

Importing lmkit registers the lmkit model with transformers' Auto classes, both ways:

- locally (``AutoConfig.register`` / ``AutoModelForCausalLM.register``), so ``AutoModelForCausalLM.from_pretrained``
  loads an lmkit folder in this process without remote code;
- for saving (``register_for_auto_class``), so every ``save_pretrained`` of an lmkit model (final outputs,
  ``checkpoint-N`` folders, merged LoRA models, exports) writes ``auto_map`` into config.json and copies
  configuration_lmkit.py and modeling_lmkit.py beside the weights: stock tools then load it with
  ``trust_remote_code=True`` and no lmkit installed.

Nothing else happens at import.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from lmkit.modeling import LMConfig, LMForCausalLM

__version__ = "0.1.0"

AutoConfig.register(LMConfig.model_type, LMConfig, exist_ok=True)
AutoModelForCausalLM.register(LMConfig, LMForCausalLM, exist_ok=True)
LMConfig.register_for_auto_class("AutoConfig")
LMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LMConfig", "LMForCausalLM", "__version__"]
