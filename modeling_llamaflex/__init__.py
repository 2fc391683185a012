"""LlamaFlex: one elastic Llama, a whole family of plain Llama sub-models (LLaMaFlex, ICLR 2025).

Importing this package registers the classes with transformers' Auto classes, so checkpoints load
without remote code too.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .architecture import Architecture, budget_loss, count_parameters, expected_parameters
from .compensation import Compensation
from .configuration_llamaflex import LlamaFlexConfig, default_choices, parse_budget
from .elastic import Policy
from .modeling_llamaflex import LlamaFlexForCausalLM, LlamaFlexModel, LlamaFlexPreTrainedModel

AutoConfig.register("llamaflex", LlamaFlexConfig, exist_ok=True)
AutoModel.register(LlamaFlexConfig, LlamaFlexModel, exist_ok=True)
AutoModelForCausalLM.register(LlamaFlexConfig, LlamaFlexForCausalLM, exist_ok=True)

__all__ = [
    "Architecture",
    "Compensation",
    "LlamaFlexConfig",
    "LlamaFlexForCausalLM",
    "LlamaFlexModel",
    "LlamaFlexPreTrainedModel",
    "Policy",
    "budget_loss",
    "count_parameters",
    "default_choices",
    "expected_parameters",
    "parse_budget",
]
