"""LoRA for the whole family: one adapter, sliced with the shared weights at every budget (PEFT integration).

`ElasticLoraLinear` is PEFT's `lora.Linear` for an `ElasticLinear` base: its forward takes the same
`out_features` as the base and slices the low-rank factors with the base weight,

    y = x·W[:out, :in]ᵀ + s · (x·A[:, :in]ᵀ)·B[:out, :]ᵀ

where `in` is read from `x` and both slices follow the base's `in_groups`/`out_groups` (query heads kept as
a prefix within every KV group). Slicing commutes with the product B·A, so a merged adapter (`merge`,
`merge_and_unload`) gives exactly the same sub-models, and so does `extract`. In masked (soft, full-width)
execution nothing is sliced: the masks act on the adapted outputs as on the base ones.

How a plain `peft.get_peft_model(flex, LoraConfig(target_modules=[...]))` finds this layer: PEFT has no
model-level hook for custom layers (its only extension point is the per-config
`LoraConfig._register_custom_module`), and `ElasticLinear` is an `nn.Linear`, so PEFT's default dispatcher
wraps it in a plain `lora.Linear`, which cannot slice. Importing this package therefore installs one torch
module-registration hook (`torch.nn.modules.module.register_module_module_registration_hook`): when PEFT
puts a plain `lora.Linear` whose base is an `ElasticLinear` into its parent, the hook turns it into an
`ElasticLoraLinear` (a subclass that adds no state, only the slicing forward). Every PEFT entry point goes
through that assignment: `get_peft_model`, `PeftModel.from_pretrained`, `inject_adapter_in_model`,
`model.add_adapter`. Registering explicitly (`register_elastic_lora(config)`) works too and gives the same
layer. Only vanilla LoRA slices; DoRA and the other LoRA variants are refused with a clear error.

peft is optional: without it this module imports, and its functions say that peft is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import is_peft_available

from .elastic import slice_dim

if is_peft_available():
    from peft.tuners.lora import Linear as _LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper
else:
    _LoraLinear = BaseTunerLayer = AuxiliaryTrainingWrapper = None


def _require_peft() -> None:
    if not is_peft_available():
        raise ImportError("LoRA for LlamaFlex needs peft: pip install peft")


def is_elastic_linear(module: nn.Module) -> bool:
    """An `ElasticLinear`, including the copy that trust_remote_code loads from a checkpoint's own code."""
    return isinstance(module, nn.Linear) and hasattr(module, "in_groups") and hasattr(module, "out_groups")


def _refuse_variants(layer: nn.Module, where: str = "") -> None:
    """Only vanilla LoRA slices: DoRA's column norms and the other variants do not commute with slicing."""
    variants = {name: type(v).__name__ for name, v in getattr(layer, "lora_variant", {}).items()}
    if variants:
        raise ValueError(
            f"LoRA variant(s) {variants} on the elastic layer {where or type(layer.get_base_layer()).__name__}: "
            "only vanilla LoRA can be sliced with the shared weights (no use_dora, no other LoRA variant)"
        )


if _LoraLinear is not None:

    class ElasticLoraLinear(_LoraLinear):
        """PEFT `lora.Linear` over an `ElasticLinear`: the adapter is sliced like the base weight.

        `lora_A` keeps the columns of the input width read from `x` (grouped as the base's `in_groups`),
        `lora_B` the rows of `out_features` (grouped as `out_groups`). Same state as `lora.Linear`, so
        merging, saving and loading adapters are PEFT's own.
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs):
            base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
            if not is_elastic_linear(base):
                raise TypeError(
                    f"ElasticLoraLinear adapts the ElasticLinear layers of a LlamaFlex model, got {type(base).__name__}; "
                    "register it for ElasticLinear only (register_elastic_lora does)"
                )
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
            super().update_layer(adapter_name, *args, **kwargs)
            _refuse_variants(self, kwargs.get("target_name", ""))

        def _lora_delta(self, x: torch.Tensor, adapter: str, out_features: int | None) -> torch.Tensor:
            """s · B[:out] · A[:, :in] · dropout(x), sliced with the base's grouping."""
            base = self.get_base_layer()
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            weight_a = slice_dim(lora_a.weight, 1, x.shape[-1], base.in_groups)
            weight_b = slice_dim(lora_b.weight, 0, out_features, base.out_groups)
            bias_b = None if lora_b.bias is None else slice_dim(lora_b.bias, 0, out_features, base.out_groups)
            x = self._cast_input_dtype(x, weight_a.dtype)
            return F.linear(F.linear(self.lora_dropout[adapter](x), weight_a), weight_b, bias_b) * self.scaling[adapter]

        def forward(self, x: torch.Tensor, out_features: int | None = None, **kwargs) -> torch.Tensor:
            self._check_forward_args(x, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters and self.merged:
                self.unmerge()
            result = self.base_layer(x, out_features, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            dtype = result.dtype
            if adapter_names is not None:  # PEFT's mixed-adapter batches: one adapter per example
                for adapter in set(adapter_names) & set(self.lora_A.keys()):
                    rows = [i for i, name in enumerate(adapter_names) if name == adapter]
                    result[rows] += self._lora_delta(x[rows], adapter, out_features).to(dtype)
                return result
            for adapter in self.active_adapters:
                if adapter in self.lora_A.keys():
                    result = result + self._lora_delta(x, adapter, out_features).to(dtype)
            return result

        def __repr__(self) -> str:
            return "elastic_" + super().__repr__()

else:
    ElasticLoraLinear = None


def _adopt_lora_layer(parent: nn.Module, name: str, submodule: nn.Module | None):
    """Module-registration hook: a plain PEFT `lora.Linear` over an `ElasticLinear` becomes `ElasticLoraLinear`."""
    if _LoraLinear is None or type(submodule) is not _LoraLinear or not is_elastic_linear(submodule.get_base_layer()):
        return None
    _refuse_variants(submodule, name)
    submodule.__class__ = ElasticLoraLinear
    return submodule


_HOOK = None


def install_peft_hook() -> None:
    """Install the module-registration hook once (a no-op without peft). Importing the package calls it."""
    global _HOOK
    if _HOOK is None and is_peft_available():
        _HOOK = torch.nn.modules.module.register_module_module_registration_hook(_adopt_lora_layer)


def register_elastic_lora(lora_config):
    """PEFT's explicit route: map `ElasticLinear` to `ElasticLoraLinear` in `lora_config`; returns the config."""
    _require_peft()
    from .elastic import ElasticLinear

    lora_config._register_custom_module({ElasticLinear: ElasticLoraLinear})
    return lora_config


# ---- the elastic model inside wrappers; the merged weights without touching the model ----


def has_peft_layers(model: nn.Module) -> bool:
    """Whether PEFT layers (LoRA layers, modules_to_save wrappers) sit inside `model`."""
    if BaseTunerLayer is None:
        return False
    return any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


def flex_model(model: nn.Module, user: str = "this"):
    """The `LlamaFlexForCausalLM` inside DeepSpeed/DDP and PEFT wrappers; a clear error for anything else."""
    seen = [type(model).__name__]
    while True:  # DeepSpeed engine / DDP (.module), then PEFT (get_base_model)
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
        seen.append(type(model).__name__)
    if getattr(getattr(model, "config", None), "model_type", None) == "llamaflex" and hasattr(model, "lm_head"):
        return model
    raise TypeError(
        f"{user} needs a LlamaFlexForCausalLM (optionally with a PEFT adapter); got {' -> '.join(seen)}"
        f" (model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}). Convert a Llama first: "
        "LlamaFlexForCausalLM.from_llama(llama), then add the adapter"
    )


def _lora_merged_weights(layer) -> dict[str, torch.Tensor]:
    """The base layer's state with the active adapters added in (nothing is added if merged or disabled)."""
    base = layer.get_base_layer()
    state = {k: v.detach() for k, v in base.state_dict().items()}
    if layer.merged or layer.disable_adapters:
        return state
    _refuse_variants(layer)
    adapters = set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())
    for adapter in layer.active_adapters:
        if adapter not in adapters:
            continue
        state["weight"] = state["weight"] + layer.get_delta_weight(adapter).to(state["weight"].dtype)
        if layer.lora_bias.get(adapter):
            state["bias"] = state["bias"] + layer.lora_B[adapter].bias.detach() * layer.scaling[adapter]
    return state


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` in the base model's own names, with the active LoRA adapters merged in.

    What `merge_and_unload()` would leave, computed without changing the model: LoRA layers give their
    base weights plus the adapters' deltas, `modules_to_save` wrappers give their active copy.
    """
    _require_peft()
    out: dict[str, torch.Tensor] = {}

    def collect(module: nn.Module, prefix: str) -> None:
        if isinstance(module, BaseTunerLayer) and hasattr(module, "lora_A"):
            out.update({prefix + k: v for k, v in _lora_merged_weights(module).items()})
            return
        if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save: the active copy, else the original
            copies = getattr(module, "modules_to_save", {})
            active = [a for a in module.active_adapters if a in copies]
            collect(module.original_module if module.disable_adapters or not active else copies[active[0]], prefix)
            return
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and name not in module._non_persistent_buffers_set:
                out[prefix + name] = tensor.detach()
        for name, child in module._modules.items():
            if child is not None:
                collect(child, f"{prefix}{name}.")

    collect(model, "")
    return out


__all__ = [
    "ElasticLoraLinear",
    "flex_model",
    "has_peft_layers",
    "install_peft_hook",
    "is_elastic_linear",
    "merged_state_dict",
    "register_elastic_lora",
]
