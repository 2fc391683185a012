"""Cutting a sub-model out of the shared weights (docs/design.md, "Extraction"), with no file I/O.

`sub_model_tensors` names every slice a sub-model needs and folds the modulation gains into
o_proj/down_proj and the hidden width's norm gains (`config.hidden_norm_gains`, if any) into the RMSNorm weights.
It reads through a `reader(name, rows, cols)`, so the same code cuts from tensors in memory (`extract`, via
`memory_reader`) and from safetensors files, reading only the needed bytes (`loading.load_at_budget`, via
`safetensors_io.SafetensorsReader`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM
from transformers.initialization import no_init_weights

from .architecture import Architecture, is_full
from .configuration_llamaflex import LlamaFlexConfig
from .elastic import norm_gains
from .lora import has_peft_layers, merged_state_dict
from .modulation import PolicyModulation


Ranges = list[tuple[int, int]] | None  # None: the whole dimension
Reader = Callable[[str, Ranges, Ranges], torch.Tensor]


def _head_ranges(config: LlamaFlexConfig, heads: int) -> Ranges:
    """Rows of q_proj (columns of o_proj) of the first heads // n_kv query heads of every KV group."""
    n_kv, d = config.num_key_value_heads, config.head_dim
    block, kept = (config.num_attention_heads // n_kv) * d, (heads // n_kv) * d
    return [(g * block, g * block + kept) for g in range(n_kv)]


# Every tensor of a sub-model, by the dimension each of its axes runs along: "hidden", "mlp", "heads" (query
# heads, a prefix within every KV group), "kv" and "vocab" (kept whole). A vector has no column axis. The third
# entry is the modulation gain folded into it (0: attention branch, 1: MLP branch).
_LAYER_TENSORS = {
    "input_layernorm.weight": ("hidden", None, None),
    "post_attention_layernorm.weight": ("hidden", None, None),
    "self_attn.q_proj.weight": ("heads", "hidden", None),
    "self_attn.k_proj.weight": ("kv", "hidden", None),
    "self_attn.v_proj.weight": ("kv", "hidden", None),
    "self_attn.o_proj.weight": ("hidden", "heads", 0),
    "mlp.gate_proj.weight": ("mlp", "hidden", None),
    "mlp.up_proj.weight": ("mlp", "hidden", None),
    "mlp.down_proj.weight": ("hidden", "mlp", 1),
}
_ATTENTION_BIASES = {
    "self_attn.q_proj.bias": ("heads", None, None),
    "self_attn.k_proj.bias": ("kv", None, None),
    "self_attn.v_proj.bias": ("kv", None, None),
    "self_attn.o_proj.bias": ("hidden", None, 0),
}
_MLP_BIASES = {"mlp.gate_proj.bias": ("mlp", None, None), "mlp.up_proj.bias": ("mlp", None, None),
               "mlp.down_proj.bias": ("hidden", None, 1)}


def _tensors(config: LlamaFlexConfig, layers) -> dict[str, tuple[str, str | None, int | None, int | None]]:
    """{name: (row axis, column axis, gain, parent layer)} of every tensor a sub-model keeping `layers` has,
    in `LlamaForCausalLM` names of the sub-model (its layers renumbered from 0)."""
    per_layer = dict(_LAYER_TENSORS)
    per_layer.update(_ATTENTION_BIASES if config.attention_bias else {})
    per_layer.update(_MLP_BIASES if config.mlp_bias else {})
    out = {"model.embed_tokens.weight": ("vocab", "hidden", None, None)}
    for new, layer in enumerate(layers):
        out.update({f"model.layers.{new}.{name}": (*axes, layer) for name, axes in per_layer.items()})
    out["model.norm.weight"] = ("hidden", None, None, None)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ("vocab", "hidden", None, None)
    return out


def _parent_name(name: str, layer: int | None) -> str:
    """The parent's name of a sub-model tensor (layer `layer` of the parent)."""
    return name if layer is None else "model.layers.{}.{}".format(layer, name.split(".", 3)[3])


def sub_model_tensors(
    config: LlamaFlexConfig, arch: Architecture, reader: Reader, gains: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The state dict, in `LlamaForCausalLM` names, of the sub-model `arch`; `gains` (2, L) are folded."""
    ranges = {"hidden": [(0, arch.hidden)], "mlp": [(0, arch.mlp)], "heads": _head_ranges(config, arch.heads),
              "kv": None, "vocab": None, None: None}
    norms = norm_gains(config, arch.indices["hidden"]) if arch.indices else None
    out = {}
    for name, (rows, cols, which, layer) in _tensors(config, arch.kept_layers).items():
        tensor = reader(_parent_name(name, layer), ranges[rows], ranges[cols])
        if gains is not None and which is not None:
            tensor = (tensor.float() * gains[which, layer].float()).to(tensor.dtype)
        if norms is not None and name.endswith("norm.weight"):
            index = 2 * config.num_hidden_layers if layer is None else 2 * layer + name.endswith("post_attention_layernorm.weight")
            tensor = (tensor.float() * norms[index]).to(tensor.dtype)
        out[name] = tensor
    return out


def full_shapes(config: LlamaFlexConfig, layers) -> dict[str, tuple[int, ...]]:
    """The parent-size shape of every parent tensor a sub-model keeping `layers` reads."""
    d = config.head_dim
    size = {"hidden": config.hidden_size, "mlp": config.intermediate_size, "heads": config.num_attention_heads * d,
            "kv": config.num_key_value_heads * d, "vocab": config.vocab_size}
    return {
        _parent_name(name, layer): tuple(size[axis] for axis in (rows, cols) if axis is not None)
        for name, (rows, cols, _, layer) in _tensors(config, sorted(layers)).items()
    }


def _take(tensor: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    if ranges is None:
        return tensor
    return torch.cat([tensor.narrow(dim, a, b - a) for a, b in ranges], dim)


def memory_reader(state: dict[str, torch.Tensor]) -> Reader:
    def read(name: str, rows: Ranges, cols: Ranges) -> torch.Tensor:
        tensor = _take(state[name], 0, rows)
        return (_take(tensor, 1, cols) if cols is not None else tensor).clone()

    return read


def sub_model_sizes(arch: Architecture) -> dict[str, int]:
    """The LlamaConfig size fields of a sub-model."""
    return {
        "hidden_size": arch.hidden,
        "num_attention_heads": arch.heads,
        "intermediate_size": arch.mlp,
        "num_hidden_layers": arch.depth,
    }


def fold_gains(modulation: PolicyModulation | None, config: LlamaFlexConfig, arch: Architecture) -> torch.Tensor | None:
    """The (2, L) gains of `arch`, computed in fp32 whatever the weights' dtype; None for the full architecture
    (it runs without modulation) or without modulation."""
    if modulation is None or is_full(config, arch.indices):
        return None
    fp32 = copy.deepcopy(modulation).float()
    for axis in fp32.axes.values():
        axis.choice_embedding = axis.make_table().to(axis.choice_embedding.device)
    with torch.no_grad():
        return fp32.for_indices(arch.indices)


def compensate(config: LlamaFlexConfig, arch: Architecture, tensors: dict[str, torch.Tensor],
               state: dict[str, torch.Tensor], gains: torch.Tensor | None, compensation) -> None:
    """Replace, in the sub-model's `tensors`, every kept layer's down_proj and o_proj by the least-squares
    refit of `compensation` (a `compensation.Compensation`), from the full-width weights in `state`."""
    from .compensation import kept_inputs

    kept = kept_inputs(config, arch)
    for new, layer in enumerate(arch.kept_layers):
        for kind, name, which in (("mlp", "mlp.down_proj.weight", 1), ("heads", "self_attn.o_proj.weight", 0)):
            full = state[f"model.layers.{layer}.{name}"][: arch.hidden]
            if gains is not None:
                full = (full.float() * gains[which, layer].float()).to(full.dtype)
            tensors[f"model.layers.{new}.{name}"] = compensation.refit(full, layer, kind, kept[kind])


@torch.no_grad()
def extract(flex, budget, compensation=None) -> LlamaForCausalLM:
    """A plain `LlamaForCausalLM` holding the sub-model of `budget` (or of an `Architecture`).

    With a PEFT adapter on `flex` (`peft_model.extract(b)`), the active LoRA adapters are merged into the
    sub-model's weights (the model itself is left as it is): the result gives the adapted model's logits.
    With a `compensation.Compensation`, the sub-model's o_proj and down_proj are refitted by least squares to
    the full width's outputs on its calibration tokens (a one-shot sub-model's quality; not nested), and a
    budget takes the best compensated architecture if the compensation was scored (`Compensation.score`).
    """
    if compensation is not None:
        from .compensation import refuse_adapted

        refuse_adapted(flex)  # before any work: the check from_data makes
    if isinstance(budget, Architecture):
        arch = budget
    else:
        arch = flex.architecture(budget) if compensation is None else compensation.architecture(flex, budget)
    state = merged_state_dict(flex) if has_peft_layers(flex) else flex.state_dict()
    gains = fold_gains(flex.model.modulation, flex.config, arch)
    tensors = sub_model_tensors(flex.config, arch, memory_reader(state), gains)
    if compensation is not None:
        compensate(flex.config, arch, tensors, state, gains, compensation)
    llama_config = flex.config.to_llama_config(**sub_model_sizes(arch))
    llama_config.dtype = flex.dtype
    with no_init_weights():
        llama = LlamaForCausalLM(llama_config)
    assign_weights(llama, tensors, flex.config.tie_word_embeddings)
    llama.generation_config = flex.generation_config
    return llama.to(flex.device).eval()


def assign_weights(model, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"sub-model weights do not fit: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()


__all__ = ["extract", "fold_gains", "full_shapes", "memory_reader", "sub_model_sizes", "sub_model_tensors"]
