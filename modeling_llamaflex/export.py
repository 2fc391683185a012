"""Cutting a sub-model out of the shared weights (DESIGN.md §5).

One function, `sub_model_tensors`, names every slice a sub-model needs and folds the modulation gains
into o_proj/down_proj. It reads through a `reader(name, rows, cols)`, so the same code cuts from tensors in
memory (`extract`) and from safetensors files, reading only the needed bytes (`load_at_budget`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable

import torch
from safetensors import safe_open
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedConfig
from transformers.initialization import no_init_weights
from transformers.utils import cached_file

from .architecture import Architecture, architecture_for_logits, is_full
from .configuration_llamaflex import LlamaFlexConfig, parse_budget
from .elastic import Policy
from .lora import has_peft_layers, merged_state_dict
from .modulation import PolicyModulation
from .router import BudgetRouter, routers_trained


Ranges = list[tuple[int, int]] | None  # None: the whole dimension
Reader = Callable[[str, Ranges, Ranges], torch.Tensor]


def _head_ranges(config: LlamaFlexConfig, heads: int) -> Ranges:
    """Rows of q_proj (columns of o_proj) of the first heads // n_kv query heads of every KV group."""
    n_kv, d = config.num_key_value_heads, config.head_dim
    block, kept = (config.num_attention_heads // n_kv) * d, (heads // n_kv) * d
    return [(g * block, g * block + kept) for g in range(n_kv)]


def sub_model_tensors(
    config: LlamaFlexConfig, arch: Architecture, reader: Reader, gains: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The state dict, in `LlamaForCausalLM` names, of the sub-model `arch`; `gains` (2, L) are folded."""
    h, f = [(0, arch.hidden)], [(0, arch.mlp)]
    heads = _head_ranges(config, arch.heads)
    out = {"model.embed_tokens.weight": reader("model.embed_tokens.weight", None, h)}
    specs = {  # name: (rows, cols, which gain)
        "input_layernorm.weight": (h, None, None),
        "post_attention_layernorm.weight": (h, None, None),
        "self_attn.q_proj.weight": (heads, h, None),
        "self_attn.k_proj.weight": (None, h, None),
        "self_attn.v_proj.weight": (None, h, None),
        "self_attn.o_proj.weight": (h, heads, 0),
        "mlp.gate_proj.weight": (f, h, None),
        "mlp.up_proj.weight": (f, h, None),
        "mlp.down_proj.weight": (h, f, 1),
    }
    if config.attention_bias:
        specs.update({
            "self_attn.q_proj.bias": (heads, None, None),
            "self_attn.k_proj.bias": (None, None, None),
            "self_attn.v_proj.bias": (None, None, None),
            "self_attn.o_proj.bias": (h, None, 0),
        })
    if config.mlp_bias:
        specs.update({
            "mlp.gate_proj.bias": (f, None, None),
            "mlp.up_proj.bias": (f, None, None),
            "mlp.down_proj.bias": (h, None, 1),
        })
    for new, layer in enumerate(arch.kept_layers):
        for name, (rows, cols, which) in specs.items():
            tensor = reader(f"model.layers.{layer}.{name}", rows, cols)
            if gains is not None and which is not None:
                tensor = (tensor.float() * gains[which, layer].float()).to(tensor.dtype)
            out[f"model.layers.{new}.{name}"] = tensor
    out["model.norm.weight"] = reader("model.norm.weight", h, None)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = reader("lm_head.weight", None, h)
    return out


def full_shapes(config: LlamaFlexConfig, layers) -> dict[str, tuple[int, ...]]:
    """The parent-size shape of every tensor a sub-model keeping `layers` reads (`sub_model_tensors`' names)."""
    d, h, f, v = config.head_dim, config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    specs = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    if config.attention_bias:
        specs.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
                      "self_attn.o_proj.bias": (h,)})
    if config.mlp_bias:
        specs.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (h,)})
    out = {"model.embed_tokens.weight": (v, h)}
    out.update({f"model.layers.{layer}.{name}": shape for layer in layers for name, shape in specs.items()})
    out["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


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


def _fold_gains(model, arch: Architecture) -> torch.Tensor | None:
    modulation = model.model.modulation if hasattr(model, "model") else model.modulation
    if modulation is None or is_full(model.config, arch.indices):
        return None  # the full architecture runs without modulation
    policy = Policy.one_hot(model.config, arch.indices, device=next(modulation.parameters()).device)
    fp32 = copy.deepcopy(modulation).float()  # gains in fp32 whatever the weights' dtype, as in load_at_budget
    for axis in fp32.axes.values():
        axis.choice_embedding = axis.make_table().to(policy.probs["hidden"].device)
    return fp32(policy.probs)


@torch.no_grad()
def extract(flex, budget) -> LlamaForCausalLM:
    """A plain `LlamaForCausalLM` holding the sub-model of `budget` (or of an `Architecture`).

    With a PEFT adapter on `flex` (`peft_model.extract(b)`), the active LoRA adapters are merged into the
    sub-model's weights (the model itself is left as it is): the result gives the adapted model's logits.
    """
    arch = budget if isinstance(budget, Architecture) else flex.architecture(budget)
    state = merged_state_dict(flex) if has_peft_layers(flex) else flex.state_dict()
    tensors = sub_model_tensors(flex.config, arch, memory_reader(state), _fold_gains(flex, arch))
    llama_config = flex.config.to_llama_config(**sub_model_sizes(arch))
    llama_config.dtype = flex.dtype
    with no_init_weights():
        llama = LlamaForCausalLM(llama_config)
    _assign(llama, tensors, flex.config.tie_word_embeddings)
    llama.generation_config = flex.generation_config
    return llama.to(flex.device).eval()


def _assign(model, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"sub-model weights do not fit: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()


# ---- loading at a budget, from safetensors, only the needed slices ----

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _hub_kwargs(kwargs: dict | None) -> dict:
    """The keywords of `kwargs` that say where and how to fetch files (hub revision, cache, token...)."""
    return {k: v for k, v in (kwargs or {}).items() if k in _HUB_KWARGS}


def resolve_load_budget(cls, path, budget, kwargs: dict):
    """Load the config (consuming config keywords from `kwargs`) and decide the budget to load at."""
    config = kwargs.pop("config", None)
    hub = _hub_kwargs(kwargs)
    if not isinstance(config, PreTrainedConfig):  # (remote code may hold another copy of our config class)
        raw, _ = PreTrainedConfig.get_config_dict(config or path, **hub)
        if raw.get("model_type") != "llamaflex":
            raise ValueError(
                f"{config or path} is a {raw.get('model_type')!r} checkpoint, not a LlamaFlex one; convert a Llama "
                "parent first: LlamaFlexForCausalLM.from_llama(...) or `python -m modeling_llamaflex convert`"
            )
        rest = {k: v for k, v in kwargs.items() if k not in hub}
        for key in ("trust_remote_code", "dtype", "torch_dtype", "device_map", "attn_implementation", "output_loading_info"):
            rest.pop(key, None)
        config, unused = cls.config_class.from_pretrained(config or path, return_unused_kwargs=True, **hub, **rest)
        for key in rest:
            if key not in unused:
                kwargs.pop(key)
    if budget is not None:
        config.budget = budget
    budget = config.budget
    if budget is not None and not config.elastic:
        _refuse_other_budget(path, budget, hub)
        return config, None  # a checkpoint already holding one sub-model: load it as is
    if budget is not None:
        parse_budget(budget, config.parent_parameters())  # clear errors before any weights are read
    return config, budget


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


def safetensors_files(path, kwargs: dict | None = None) -> dict[str, str]:
    """Map every tensor name to the local safetensors file that holds it."""
    hub = _hub_kwargs(kwargs)
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        folder = os.path.dirname(index)
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub)
    if single is None:
        raise FileNotFoundError(f"{path} has no model.safetensors(.index.json): loading at a budget needs safetensors weights")
    with safe_open(single, "pt") as fh:
        return {name: single for name in fh.keys()}


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads row and column ranges of named tensors from safetensors files with plain file reads.

    No memory map: a column slice of a row-major matrix touches nearly every page of it, and mapped pages
    count as resident memory. Rows are read in chunks of at most `chunk_bytes` into one reusable buffer and
    only the kept columns are copied out, so memory at load is the sub-model plus that buffer.
    """

    def __init__(self, files: dict[str, str], chunk_bytes: int = 16 * 2**20, source=None):
        self.files = files
        self.source = source if source is not None else (os.path.dirname(next(iter(files.values()))) if files else "?")
        self.chunk_bytes = chunk_bytes
        self._buffer: torch.Tensor | None = None
        self._headers: dict[str, tuple[int, dict]] = {}

    def _entry(self, name: str) -> tuple[str, int, dict]:
        if name not in self.files:
            raise ValueError(
                f"checkpoint {self.source} has no tensor {name}: it is incomplete or was saved for another "
                "config; re-save the checkpoint"
            )
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = self._read_header(file)
        start, header = self._headers[file]
        if name not in header:
            raise ValueError(
                f"checkpoint {self.source}: its index puts tensor {name} in {os.path.basename(file)}, which does not "
                "hold it; re-save the checkpoint"
            )
        return file, start, header[name]

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)[2]["shape"])

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Refuse, before any read, tensors that are missing or whose shape is not the one the config gives."""
        missing = [n for n in expected if n not in self.files]
        if missing:
            raise ValueError(
                f"checkpoint {self.source} is missing tensor(s) its config needs: {_names(missing, '')}; it is "
                "incomplete or was saved for another config"
            )
        wrong = [(n, self.shape(n), list(shape)) for n, shape in expected.items() if self.shape(n) != list(shape)]
        if wrong:
            shown = "; ".join(f"{n} is {got}, the config needs {want}" for n, got, want in wrong[:4])
            more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
            raise ValueError(
                f"checkpoint {self.source} holds tensor(s) of the wrong shape for its config.json: {shown}{more}; "
                "the weights and the config do not belong together"
            )

    @staticmethod
    def _read_header(file: str) -> tuple[int, dict]:
        """The data offset and header of `file`, refusing a file shorter than its header says (a damaged shard)."""
        with open(file, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            size = int.from_bytes(fh.read(8), "little")
            try:
                if 8 + size > file_size:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(size))
            except ValueError as err:
                raise OSError(
                    f"{file} is not a readable safetensors file ({err}): it is damaged or truncated; re-download or "
                    "re-save the checkpoint"
                ) from None
        data = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
        if 8 + size + data > file_size:
            raise OSError(
                f"{file} is truncated: its header describes {8 + size + data:,} bytes but the file holds "
                f"{file_size:,}; re-download or re-save the checkpoint"
            )
        return 8 + size, header

    def __call__(self, name: str, rows: Ranges, cols: Ranges) -> torch.Tensor:
        file, start, entry = self._entry(name)
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        offset = start + entry["data_offsets"][0]
        row_numel = int(torch.Size(shape[1:]).numel())
        item = torch.empty((), dtype=dtype).element_size()
        rows = rows or [(0, shape[0])]
        cols = cols or ([(0, shape[1])] if len(shape) > 1 else None)
        width = sum(d - c for c, d in cols) if cols else row_numel
        out = torch.empty(sum(b - a for a, b in rows), *([width] if len(shape) > 1 else []), dtype=dtype)
        chunk_rows = max(1, self.chunk_bytes // max(1, row_numel * item))
        need = min(chunk_rows, shape[0]) * row_numel * item
        if self._buffer is None or self._buffer.numel() < need:  # one buffer for every read: no heap churn
            self._buffer = torch.empty(max(need, self.chunk_bytes), dtype=torch.uint8)
        done = 0
        with open(file, "rb", buffering=0) as fh:
            for a, b in rows:
                for r in range(a, b, chunk_rows):
                    n = min(chunk_rows, b - r)
                    raw = self._buffer[: n * row_numel * item]
                    fh.seek(offset + r * row_numel * item)
                    if fh.readinto(memoryview(raw.numpy())) != raw.numel():  # never keep an earlier read's bytes
                        raise OSError(f"{file} ended inside tensor {name}: the file is truncated; re-download or re-save it")
                    block = raw.view(dtype).reshape(n, *shape[1:])
                    if cols is None:
                        out[done : done + n] = block
                    else:
                        col = 0
                        for c, d in cols:
                            out[done : done + n, col : col + d - c] = block[:, c:d]
                            col += d - c
                    done += n
        return out

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: self(n, None, None) for n in self.files if n.startswith(prefix)}


def router_architectures(path, config: LlamaFlexConfig, budgets, reader: SafetensorsReader | None = None, **kwargs):
    """{budget: Architecture} from the checkpoint's router weights alone (no model weights are read)."""
    reader = reader or SafetensorsReader(safetensors_files(path, kwargs), source=path)
    router_state = reader.module_state("model.router.")
    if not router_state:
        raise ValueError(
            f"{path} has no router weights (model.router.*): it cannot choose an architecture for budget "
            f"{budgets[0]!r}. Load it without a budget, or train it with training/run.py first."
        )
    router = BudgetRouter(config)
    router_state.setdefault("trained_steps", torch.zeros(1, dtype=torch.long))  # checkpoints from before it
    try:
        router.load_state_dict(router_state)
    except RuntimeError as err:  # missing or wrong-shaped router weights (torch names them)
        raise ValueError(
            f"checkpoint {path}: its router weights (model.router.*) do not fit its config.json: "
            + " ".join(str(err).split()).removeprefix("Error(s) in loading state_dict for BudgetRouter: ")
        ) from None
    trained = routers_trained(router)
    out = {}
    with torch.no_grad():
        for budget in budgets:
            b = parse_budget(budget, config.parent_parameters())
            out[budget] = architecture_for_logits(config, b, router(torch.tensor(b)), trained)
    return out


def _names(keys: list[str], prefix: str = "model.modulation.", shown: int = 6) -> str:
    names = ", ".join(prefix + k for k in keys[:shown])
    return names + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def load_at_budget(cls, path, config: LlamaFlexConfig, budget, **kwargs):
    """A model holding only the sub-model of `budget`, read slice by slice from the checkpoint."""
    reader = SafetensorsReader(safetensors_files(path, kwargs), source=path)
    arch = router_architectures(path, config, [budget], reader)[budget]
    reader.check_shapes(full_shapes(config, arch.kept_layers))
    gains = None
    if config.use_modulation and not is_full(config, arch.indices):
        modulation = PolicyModulation(config)
        try:
            missing, _ = modulation.load_state_dict(reader.module_state("model.modulation."), strict=False)
        except RuntimeError as err:  # wrong-shaped modulation weights
            raise ValueError(
                f"checkpoint {path}: its modulation weights (model.modulation.*) do not fit its config.json: "
                + " ".join(str(err).split()).removeprefix("Error(s) in loading state_dict for PolicyModulation: ")
            ) from None
        if missing:  # a fresh PolicyModulation holds random gains: never fold those in
            raise ValueError(
                f"{path} does not hold the modulation weights this config needs (use_modulation=True): missing "
                f"{_names(missing)}. Load a complete checkpoint, or set use_modulation=False in its config if it "
                "was trained without modulation"
            )
        with torch.no_grad():
            gains = modulation(Policy.one_hot(config, arch.indices).probs)
    tensors = sub_model_tensors(config, arch, reader, gains)

    data = config.to_dict()
    data.update(sub_model_sizes(arch))
    data.update(
        hidden_choices=[arch.hidden], head_choices=[arch.heads], mlp_choices=[arch.mlp], depth_choices=[arch.depth],
        layer_ranking=list(range(arch.depth)), elastic=False, budget=budget,
    )
    for key in ("model_type", "transformers_version", "auto_map"):
        data.pop(key, None)
    sub_config = LlamaFlexConfig(**data)
    if kwargs.get("attn_implementation"):
        sub_config._attn_implementation = kwargs["attn_implementation"]
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    with no_init_weights():
        model = cls(sub_config)
    if cls.base_model_prefix and not hasattr(model, cls.base_model_prefix):  # the bare decoder
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        _assign(model, tensors, tied=False)
    else:
        _assign(model, tensors, config.tie_word_embeddings)
    try:  # generate() follows the checkpoint's generation config (KV cache, special tokens), as for the full model
        model.generation_config = GenerationConfig.from_pretrained(path, **_hub_kwargs(kwargs))
    except OSError:
        pass
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    device = kwargs.get("device_map")
    if isinstance(device, (str, torch.device)) and device != "auto":
        model = model.to(device)
    return model.eval()


__all__ = ["extract", "load_at_budget", "router_architectures", "safetensors_files", "sub_model_tensors"]
