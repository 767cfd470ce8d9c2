"""lmkit: pretrain and fine-tune causal language models on the Hugging Face stack.

Importing lmkit registers the lmkit model with transformers' Auto classes, both ways:

- locally (``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM.register``), so ``AutoModelForCausalLM`` (the
  model with its head) and ``AutoModel`` (the decoder alone) load an lmkit folder in this process without remote
  code;
- for saving (``register_for_auto_class``), so every ``save_pretrained`` of an lmkit model (final outputs,
  ``checkpoint-N`` folders, merged LoRA models, exports) writes ``auto_map`` (AutoConfig, AutoModel,
  AutoModelForCausalLM) into config.json and copies configuration_lmkit.py and modeling_lmkit.py beside the
  weights: stock tools then load it with ``trust_remote_code=True`` and no lmkit installed.

Nothing else happens at import.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lmkit.modeling import LMConfig, LMForCausalLM, LMModel

__version__ = "0.1.0"

AutoConfig.register(LMConfig.model_type, LMConfig, exist_ok=True)
AutoModel.register(LMConfig, LMModel, exist_ok=True)
AutoModelForCausalLM.register(LMConfig, LMForCausalLM, exist_ok=True)
LMConfig.register_for_auto_class("AutoConfig")
LMModel.register_for_auto_class("AutoModel")
LMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LMConfig", "LMForCausalLM", "__version__"]
