"""`from_pretrained` for LlamaFlex checkpoints: the config and budget to load at, what is refused, strict
loading of the whole model, and loading one sub-model at a budget by reading only its slices."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedConfig
from transformers.initialization import no_init_weights

from .architecture import architecture_for_logits, is_full
from .configuration_llamaflex import LlamaFlexConfig, model_fields, parse_budget
from .modulation import PolicyModulation
from .router import BudgetRouter, routers_trained
from .safetensors_io import SafetensorsReader, hub_kwargs, safetensors_files
from .slicing import assign_weights, fold_gains, full_shapes, sub_model_sizes, sub_model_tensors

_MODEL_KWARGS = ("trust_remote_code", "dtype", "torch_dtype", "device_map", "attn_implementation", "output_loading_info")


def refuse_unsupported(config: PreTrainedConfig | None, kwargs: dict, at_budget: bool) -> None:
    """Refuse, before anything is read, loading options that would silently break the elastic weights."""
    if kwargs.get("quantization_config") is not None or kwargs.get("load_in_8bit") or kwargs.get("load_in_4bit") or (
        getattr(config, "quantization_config", None) is not None
    ):
        raise ValueError(
            "LlamaFlex checkpoints cannot be loaded quantised (quantization_config / load_in_8bit / load_in_4bit): a "
            "quantised Linear no longer slices its own weight, so sub-models would break. Load it unquantised; to "
            "quantise, extract a sub-model (`model.extract(b)` or `from_pretrained(..., budget=b)` then "
            "`save_pretrained`) and quantise that plain Llama"
        )
    if kwargs.get("tp_plan") is not None:
        raise ValueError(
            "tensor parallelism (tp_plan) is not supported: a shard of an elastic weight is not a prefix of it. Use "
            "DeepSpeed ZeRO-3 or FSDP to shard training, or extract a plain Llama sub-model and serve that with tp_plan"
        )
    device = kwargs.get("device_map")
    if at_budget and device is not None and not _one_device(device):
        raise ValueError(
            f"device_map={device!r} is not supported when loading at a budget: the sub-model is small and loads whole. "
            "Give one device (device_map='cuda:0', 'cpu' or an index), or load without a budget to use a device map"
        )


def _single_device(device):
    """The one device of a device map that puts everything there ({"": "cpu"}, as lm-eval and accelerate pass)."""
    if isinstance(device, dict) and set(device) == {""}:
        return device[""]
    return device


def _one_device(device) -> bool:
    device = _single_device(device)
    try:
        torch.device(device)
        return True
    except (TypeError, RuntimeError):  # "auto", "balanced", a {module: device} map...
        return False


def resolve_load_budget(cls, path, budget, kwargs: dict):
    """Load the config (consuming config keywords from `kwargs`) and decide the budget to load at."""
    config = kwargs.pop("config", None)
    hub = hub_kwargs(kwargs)
    if not isinstance(config, PreTrainedConfig):  # (remote code may hold another copy of our config class)
        raw, _ = PreTrainedConfig.get_config_dict(config or path, **hub)
        if raw.get("model_type") != "llamaflex":
            raise ValueError(
                f"{config or path} is a {raw.get('model_type')!r} checkpoint, not a LlamaFlex one; convert a Llama "
                "parent first: LlamaFlexForCausalLM.from_llama(...) or `python -m modeling_llamaflex convert`"
            )
        rest = {k: v for k, v in kwargs.items() if k not in hub and k not in _MODEL_KWARGS}
        config, unused = cls.config_class.from_pretrained(config or path, return_unused_kwargs=True, **hub, **rest)
        for key in rest:
            if key not in unused:
                kwargs.pop(key)
    if budget is not None:
        config.budget = budget
    budget = config.budget
    refuse_unsupported(config, kwargs, at_budget=budget is not None and config.elastic)
    if budget is not None and not config.elastic:
        _refuse_other_budget(path, budget, hub)
        return config, None  # a checkpoint already holding one sub-model: load it as is
    if budget is not None:
        parse_budget(budget, config.parent_parameters())  # clear errors before any weights are read
    return config, budget


def check_loading_info(path, config: LlamaFlexConfig, info: dict) -> None:
    """Strict loading: refuse a checkpoint whose weights do not match the model (transformers only warns)."""
    missing = list(info.get("missing_keys") or [])
    routers = [k for k in missing if ".router." in f".{k}"]
    if routers and config.elastic:
        raise ValueError(
            f"{path} has no router weights ({routers[0]} and {len(routers) - 1} more missing): it cannot choose an "
            "architecture for a budget. Build an elastic model from a Llama with LlamaFlexForCausalLM.from_llama(...) "
            "and train it, or load a LlamaFlex checkpoint."
        )
    problems = []
    if missing:
        problems.append(f"missing {_names(sorted(missing))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {_names(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        shown = [f"{k} ({tuple(a)} in the file, {tuple(b)} in the model)" for k, a, b in list(info["mismatched_keys"])[:4]]
        problems.append(f"wrong shape {'; '.join(shown)}")
    if problems:
        raise ValueError(
            f"checkpoint {path} does not fit its config.json: {'; '.join(problems)}. It is incomplete or was saved for "
            "another config; re-save it (nothing was loaded)"
        )


def _same_budget(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def _refuse_other_budget(path, budget, hub: dict) -> None:
    """A folder holding one sub-model loads only at its own budget (the Auto classes put `budget=` in the config)."""
    try:
        saved = PreTrainedConfig.get_config_dict(path, **hub)[0].get("budget")
    except OSError:
        return  # no config.json of its own to compare with (a config given explicitly)
    if not _same_budget(budget, saved):
        raise ValueError(
            f"{path} holds one sub-model only, that of budget {saved!r} (saved after loading at a budget), so it "
            f"cannot be loaded at budget {budget!r}. Load it without a budget (or at {saved!r}), or load the elastic "
            "checkpoint it came from at the budget you want"
        )


def _module_from_checkpoint(module: torch.nn.Module, state: dict, prefix: str, path) -> torch.nn.Module:
    """`module` with the checkpoint's `prefix*` weights `state`, loaded strictly; a clear error names what does not fit."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # wrong-shaped weights (torch names them)
        detail = " ".join(str(err).split()).split(":", 1)[-1].strip()
        name = prefix.split(".")[1]  # router, modulation
        raise ValueError(f"checkpoint {path}: its {name} weights ({prefix}*) do not fit its config.json: {detail}") from None
    if missing or unexpected:  # a fresh module holds random weights: never use those
        problems = [f"missing {_names([prefix + k for k in missing])}"] if missing else []
        problems += [f"unexpected {_names([prefix + k for k in unexpected])}"] if unexpected else []
        hint = ", or set use_modulation=False in its config if it was trained without modulation" if "modulation" in prefix else ""
        raise ValueError(
            f"{path} does not hold the {prefix}* weights its config needs: {'; '.join(problems)}. Load a complete "
            f"checkpoint{hint}"
        )
    return module


def router_architectures(path, config: LlamaFlexConfig, budgets, reader: SafetensorsReader | None = None, **kwargs):
    """{budget: Architecture} from the checkpoint's router weights alone (no model weights are read)."""
    reader = reader or SafetensorsReader(safetensors_files(path, kwargs), source=path)
    if not any(n.startswith("model.router.") for n in reader.files):
        raise ValueError(
            f"{path} has no router weights (model.router.*): it cannot choose an architecture for budget "
            f"{budgets[0]!r}. Load it without a budget, or train it with training/run.py first."
        )
    state = reader.module_state("model.router.")
    state.setdefault("trained_steps", torch.zeros(1, dtype=torch.long))  # checkpoints from before it: untrained
    router = _module_from_checkpoint(BudgetRouter(config), state, "model.router.", path)
    trained = routers_trained(router)
    out = {}
    with torch.no_grad():
        for budget in budgets:
            b = parse_budget(budget, config.parent_parameters())
            out[budget] = architecture_for_logits(config, b, router(torch.tensor(b)), trained)
    return out


def load_at_budget(cls, path, config: LlamaFlexConfig, budget, **kwargs):
    """A model holding only the sub-model of `budget`, read slice by slice from the checkpoint."""
    reader = SafetensorsReader(safetensors_files(path, kwargs), source=path)
    arch = router_architectures(path, config, [budget], reader)[budget]
    reader.check_shapes(full_shapes(config, arch.kept_layers))
    modulation = None
    if config.use_modulation and not is_full(config, arch.indices):
        state = reader.module_state("model.modulation.")
        modulation = _module_from_checkpoint(PolicyModulation(config), state, "model.modulation.", path)
    tensors = sub_model_tensors(config, arch, reader, fold_gains(modulation, config, arch))

    data = model_fields(config.to_dict())
    data.update(sub_model_sizes(arch))
    data.update(
        hidden_choices=[arch.hidden], head_choices=[arch.heads], mlp_choices=[arch.mlp], depth_choices=[arch.depth],
        layer_ranking=list(range(arch.depth)), elastic=False, budget=budget, hidden_norm_gains=None,  # folded
    )
    sub_config = LlamaFlexConfig(**data)
    if kwargs.get("attn_implementation"):
        sub_config._attn_implementation = kwargs["attn_implementation"]
    with no_init_weights():
        model = cls(sub_config)
    if cls.base_model_prefix and not hasattr(model, cls.base_model_prefix):  # the bare decoder
        assign_weights(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, tied=False)
    else:
        assign_weights(model, tensors, config.tie_word_embeddings)
    try:  # generate() follows the checkpoint's generation config (KV cache, special tokens), as for the full model
        model.generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs(kwargs))
    except OSError:
        pass
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    device = _single_device(kwargs.get("device_map"))
    if device is not None:
        model = model.to(device)
    return model.eval()


def _names(keys: list[str], shown: int = 6) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


__all__ = ["check_loading_info", "load_at_budget", "refuse_unsupported", "resolve_load_budget", "router_architectures"]
