"""From a Llama parent to an elastic LlamaFlex model (DESIGN.md §3.1)."""

from __future__ import annotations

import logging
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_llamaflex import LlamaFlexConfig

logger = logging.getLogger(__name__)


def load_llama(llama) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` from a model or a path; anything not Llama-shaped is refused."""
    if isinstance(llama, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(llama)
        check_llama_config(config, source=str(llama))
        return LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32)
    check_llama_config(getattr(llama, "config", None), source=type(llama).__name__)
    if not isinstance(llama, LlamaForCausalLM):
        raise TypeError(f"the parent must be a transformers LlamaForCausalLM, got {type(llama).__name__}")
    return llama


def check_llama_config(config, source: str) -> None:
    if not isinstance(config, LlamaConfig) or getattr(config, "model_type", None) != "llama":
        kind = getattr(config, "model_type", type(config).__name__)
        raise ValueError(
            f"{source} is not a Llama-shaped parent (model_type {kind!r}); LlamaFlex converts 'llama' checkpoints "
            "(Llama 2, Llama 3.x)"
        )


@torch.no_grad()
def from_llama(cls, llama, calibration_data=None, **elastic):
    """An elastic model holding the parent's weights; at full budget it gives the parent's logits.

    Without `calibration_data` the units keep the parent's order.
    """
    llama = load_llama(llama)
    config = LlamaFlexConfig.from_llama_config(llama.config, **elastic)
    flex = cls(config).to(dtype=llama.dtype, device=llama.device)
    missing, unexpected = flex.load_state_dict(llama.state_dict(), strict=False)
    missing = [k for k in missing if ".router." not in k and ".modulation." not in k and k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"the parent's weights do not fit a LlamaFlex model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        flex.tie_weights()
    flex.generation_config = llama.generation_config
    if calibration_data is None:
        logger.info("no calibration data: the units keep the parent's order (no importance ranking)")
    return flex.eval()


__all__ = ["from_llama", "load_llama"]
