"""LoRA for the whole family: one adapter, sliced with the shared weights at every budget (PEFT integration).

`ElasticLoraLinear` is PEFT's `lora.Linear` for an `ElasticLinear` base. It keeps PEFT's forward, merging,
saving and loading, and changes only what slicing needs: its two factors are sliced like the base weight,

    y = x·W[:out, :in]ᵀ + s · (x·A[:, :in]ᵀ)·B[:out, :]ᵀ

where `in` is read from `x` (`lora_A` keeps those columns, grouped as the base's `in_groups`) and `out` is
the `out_features` the layer is called with (`lora_B` keeps those rows, grouped as `out_groups`: query heads
kept as a prefix within every KV group). Slicing commutes with the product B·A, so a merged adapter (`merge`,
`merge_and_unload`) gives exactly the same sub-models, and so does `extract`. In masked (soft, full-width)
execution nothing is sliced: the masks act on the adapted outputs as on the base ones.

How PEFT gets this layer: through PEFT's own per-config mapping (`LoraConfig._register_custom_module`), which
`LoraModel._create_new_module` consults before its default dispatcher (that one would wrap an `ElasticLinear`,
an `nn.Linear`, in a plain `lora.Linear` that cannot slice). The helpers set that mapping:

    model = add_lora(flex, LoraConfig(r=16, target_modules=[...]))   # get_peft_model, elastic layers
    model = load_lora(flex, "runs/x/adapter")                         # PeftModel.from_pretrained, the same
    config = lora_config(r=16, target_modules=[...])                  # a LoraConfig with the mapping, for any
                                                                      # PEFT entry point (get_peft_model, ...)

Without the mapping (a plain `get_peft_model(flex, LoraConfig(...))`, `PeftModel.from_pretrained(flex, path)`)
the modules holding the elastic layers refuse PEFT's unsliced layer when PEFT puts it in (`ElasticParent`), with
an error that names these helpers. Only vanilla LoRA slices: DoRA and the other LoRA variants are refused.

peft is optional: without it this module imports, and its functions say that peft is needed.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import is_peft_available

from .elastic import ElasticLinear, slice_dim

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


HELP = (
    "add the adapter with modeling_llamaflex.lora.add_lora(model, LoraConfig(...)), load one with "
    "modeling_llamaflex.lora.load_lora(model, path), or build the config with modeling_llamaflex.lora.lora_config(...) "
    "(PEFT's custom-module mapping ElasticLinear -> ElasticLoraLinear)"
)


def _refuse_variants(layer: nn.Module, where: str = "") -> None:
    """Only vanilla LoRA slices: DoRA's column norms and the other variants do not commute with slicing."""
    variants = {name: type(v).__name__ for name, v in getattr(layer, "lora_variant", {}).items()}
    if variants:
        raise ValueError(
            f"LoRA variant(s) {variants} on the elastic layer {where or type(layer.get_base_layer()).__name__}: "
            "only vanilla LoRA can be sliced with the shared weights (no use_dora, no other LoRA variant)"
        )


class ElasticParent(nn.Module):
    """Base of the modules that hold `ElasticLinear` layers (attention, MLP): refuses a PEFT layer that cannot slice.

    Every PEFT entry point puts its layers into the model with `setattr(parent, name, layer)`; a PEFT layer whose
    base is an `ElasticLinear` but which does not slice with it (PEFT's plain `lora.Linear` when the config lacks
    the elastic mapping, or another tuner's layer) would fail at the first sliced budget, so it is refused here.
    """

    def __setattr__(self, name: str, value) -> None:
        if (
            BaseTunerLayer is not None
            and isinstance(value, BaseTunerLayer)
            and not getattr(value, "slices_with_base", False)
            and is_elastic_linear(value.get_base_layer())
        ):
            kind = type(value).__module__ + "." + type(value).__qualname__
            raise TypeError(
                f"PEFT put a {kind} on the ElasticLinear {name!r} of {type(self).__name__}: that layer cannot be sliced "
                f"with the weights at the model's budgets. For LoRA, {HELP}"
            )
        super().__setattr__(name, value)


# The output width of the ElasticLoraLinear forward in progress: PEFT calls `lora_B(h)` with no width, so the
# layer's forward binds it for that call (a context variable: per thread, forwards at different budgets may run
# at once).
_OUT_FEATURES: contextvars.ContextVar[int | None] = contextvars.ContextVar("llamaflex_lora_out_features", default=None)


class _ElasticLoraA(nn.Linear):
    """`lora_A` of an elastic layer: the columns of the input width, grouped as the base's `in_groups`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, slice_dim(self.weight, 1, x.shape[-1], self.groups), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", in_groups={self.groups}"


class _ElasticLoraB(nn.Linear):
    """`lora_B` of an elastic layer: the rows of the forward's `out_features`, grouped as the base's `out_groups`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _OUT_FEATURES.get()
        bias = None if self.bias is None else slice_dim(self.bias, 0, out, self.groups)
        return F.linear(x, slice_dim(self.weight, 0, out, self.groups), bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_groups={self.groups}"


def _sliced_factor(linear: nn.Linear, cls: type, groups: int) -> nn.Linear:
    """`linear` as `cls`, holding the very same parameters (PEFT's initialisation, device and dtype kept)."""
    factor = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    factor.weight, factor.bias = linear.weight, linear.bias
    factor.groups = groups
    factor.train(linear.training)
    return factor


if _LoraLinear is not None:

    class ElasticLoraLinear(_LoraLinear):
        """PEFT `lora.Linear` over an `ElasticLinear`: the adapter is sliced like the base weight.

        PEFT's forward, merge, unmerge and state (`lora_A.<adapter>.weight`, ...) as they are; the factors are
        sliced `nn.Linear`s (`lora_A` by the input width, `lora_B` by the `out_features` this layer is called
        with, which the forward binds for the call) and LoRA variants are refused.
        """

        slices_with_base = True  # ElasticParent's mark (duck-typed: the trust_remote_code copy has its own class)

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs):
            base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
            if not is_elastic_linear(base):
                raise TypeError(
                    f"ElasticLoraLinear adapts the ElasticLinear layers of a LlamaFlex model, got {type(base).__name__}; "
                    "register it for ElasticLinear only (lora_config, add_lora and load_lora do)"
                )
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def resolve_lora_variant(self, *, config, **kwargs):
            variant = super().resolve_lora_variant(config=config, **kwargs)
            if variant is not None:
                raise ValueError(
                    f"LoRA variant {type(variant).__name__} on the elastic layer {kwargs.get('target_name', '')}: only "
                    "vanilla LoRA can be sliced with the shared weights (no use_dora, no other LoRA variant)"
                )
            return None

        def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
            super().update_layer(adapter_name, *args, **kwargs)
            base = self.get_base_layer()
            self.lora_A[adapter_name] = _sliced_factor(self.lora_A[adapter_name], _ElasticLoraA, base.in_groups)
            self.lora_B[adapter_name] = _sliced_factor(self.lora_B[adapter_name], _ElasticLoraB, base.out_groups)

        def forward(self, x: torch.Tensor, out_features: int | None = None, **kwargs) -> torch.Tensor:
            token = _OUT_FEATURES.set(out_features)
            try:
                return super().forward(x, out_features, **kwargs)
            finally:
                _OUT_FEATURES.reset(token)

        def __repr__(self) -> str:
            return "elastic_" + super().__repr__()

else:
    ElasticLoraLinear = None


# ---- the helpers: PEFT with the elastic mapping ----


def register_elastic_lora(lora_config, model: nn.Module | None = None):
    """Map `ElasticLinear` to `ElasticLoraLinear` in `lora_config` (PEFT's custom-module mapping); returns it.

    With `model`, the `ElasticLinear` classes found in it are mapped too (a checkpoint loaded with
    trust_remote_code=True has its own copy of the class).
    """
    _require_peft()
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"LoRA for LlamaFlex takes a peft.LoraConfig, got {type(lora_config).__name__}")
    classes = {ElasticLinear}
    if model is not None:
        classes |= {type(m) for m in model.modules() if is_elastic_linear(m)}
    lora_config._register_custom_module({cls: ElasticLoraLinear for cls in classes})
    return lora_config


def lora_config(**kwargs):
    """`peft.LoraConfig(**kwargs)` with the elastic mapping: use it with any PEFT entry point."""
    _require_peft()
    from peft import LoraConfig

    return register_elastic_lora(LoraConfig(**kwargs))


def add_lora(model: nn.Module, config=None, adapter_name: str = "default", **kwargs):
    """`peft.get_peft_model(model, config)` with the elastic LoRA layers; `config` a `LoraConfig`, or its fields.

    `model`: a `LlamaFlexForCausalLM`, or a PEFT model of one (the adapter is then added to it as
    `adapter_name`). `config` gets the elastic mapping registered (in place). Returns the PEFT model.
    """
    _require_peft()
    from peft import PeftModel, get_peft_model

    if config is None:
        config = lora_config(**kwargs)
    elif kwargs:
        raise TypeError("give add_lora a LoraConfig or its fields, not both")
    flex = flex_model(model, "add_lora")
    register_elastic_lora(config, flex)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        return model
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_lora(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
    """`peft.PeftModel.from_pretrained(model, path)` with the elastic LoRA layers (a saved LoRA adapter)."""
    _require_peft()
    from peft import LoraConfig, PeftConfig, PeftModel

    flex = flex_model(model, "load_lora")
    if isinstance(model, PeftModel):
        raise TypeError("load_lora takes the bare LlamaFlex model (the adapter's base), not a PEFT model")
    config = PeftConfig.from_pretrained(path, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs})
    if not isinstance(config, LoraConfig):
        raise TypeError(f"load_lora loads LoRA adapters; {path} holds a {type(config).__name__}")
    register_elastic_lora(config, flex)
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs)


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


def active_copy(module: nn.Module) -> nn.Module:
    """What runs in a PEFT `modules_to_save` wrapper's forward: its active adapter's copy, or its original module
    when adapters are off; any other module is itself. (Writing into the wrapper's attributes reaches only the
    original, so whoever fits a wrapped module, as `search.fit_routers` does, fits this.)"""
    copies = getattr(module, "modules_to_save", None)
    if copies is None or not hasattr(module, "original_module"):
        return module
    active = [a for a in module.active_adapters if a in copies]
    return module.original_module if module.disable_adapters or not active else copies[active[0]]


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
            collect(active_copy(module), prefix)
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
    "active_copy",
    "ElasticParent",
    "add_lora",
    "flex_model",
    "has_peft_layers",
    "is_elastic_linear",
    "load_lora",
    "lora_config",
    "merged_state_dict",
    "register_elastic_lora",
]
