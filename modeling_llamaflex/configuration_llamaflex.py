"""LlamaFlexConfig: a Llama parent plus the choices of every elastic axis.

The parent's own fields are exactly `LlamaConfig`'s. On top of them a LlamaFlex config names, for each
elastic axis, the sizes a sub-model may take (the largest is always the parent's size), the layer ranking
used to drop layers, the budgets trained on, and the sizes of the routers and modulation networks.
"""

from __future__ import annotations

import math
import re

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

AXES = ("hidden", "heads", "mlp", "depth")


def _round_to(value: float, multiple: int, low: int) -> int:
    return max(low, int(round(value / multiple)) * multiple)


def default_choices(config: LlamaConfig, steps: int = 16) -> dict[str, list[int]]:
    """Sensible default choices for a Llama parent: about half to all of each axis, every combination exportable.

    heads: from half to all query heads per KV group, keeping only counts that divide `hidden_size` (transformers'
    LlamaConfig refuses `hidden_size % num_attention_heads != 0` even with `head_dim` set); hidden: 1/2 .. 1 of
    the residual width in eighths, rounded to a multiple of every head choice (and of 64, or of 8 for small
    models); mlp: 1/4 .. 1 in sixteenths; depth: 1/2 .. all layers in steps of a sixteenth of the layers (every
    layer up to 31 layers, every second one for Llama 3.1 8B's 32). Fine MLP and depth steps give the quality
    search more candidates near every budget and the family fewer flat steps: on SmolLM2 the one-shot family
    is better at 17 of 19 budgets than with eighths (bench/QUALITY.md, "Choice grid"). `steps=8` gives the first
    release's MLP and depth choices (eighths).
    """
    hidden, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n_kv = config.num_key_value_heads
    per_group = config.num_attention_heads // n_kv
    heads_c = sorted({n_kv * k for k in range(max(1, math.ceil(per_group / 2)), per_group + 1)})
    heads_c = [c for c in heads_c if hidden % c == 0] or [config.num_attention_heads]
    h_mult = math.lcm(64 if hidden >= 1024 else 8, *heads_c)
    f_mult = 256 if mlp >= 4096 else 8
    hidden_c = sorted({_round_to(hidden * i / 8, h_mult, h_mult) for i in range(4, 8)} | {hidden})
    mlp_c = sorted({_round_to(mlp * i / steps, f_mult, f_mult) for i in range(steps // 4, steps)} | {mlp})
    step = max(1, layers // steps)
    depth_c = sorted({d for d in range(layers, max(1, layers // 2) - 1, -step)} | {layers})
    return {
        "hidden_choices": [c for c in hidden_c if c <= hidden],
        "head_choices": heads_c,
        "mlp_choices": [c for c in mlp_c if c <= mlp],
        "depth_choices": [d for d in depth_c if d >= 1],
    }


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT])\s*$")
_UNITS = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_budget(budget: float | int | str, parent_parameters: int) -> float:
    """A budget as a fraction of the parent's non-embedding parameters.

    Accepts a fraction in (0, 1] (a number, or a string that reads as one: "0.5" is 0.5), or an absolute size
    with a unit, such as "3B", "350M" or "150K", up to the parent's own size.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(
            f"budget must be a number in (0, 1] or a size such as '3B' or '350M', got {budget!r} "
            f"({type(budget).__name__})"
        )
    given = budget
    if isinstance(budget, str):
        match = _SIZE.match(budget)
        if match is not None:  # a size: the number of parameters to keep
            count = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if count > parent_parameters:
                raise ValueError(
                    f"budget {given!r} asks for {count:,.0f} parameters, more than the parent's "
                    f"{parent_parameters:,} non-embedding parameters (a fraction of {count / parent_parameters:.4g}, "
                    f"outside (0, 1]): give a size up to {parent_parameters:,}, or a fraction in (0, 1]"
                )
            budget = count / parent_parameters
        else:
            try:  # a plain number in a string reads as that number: a fraction
                budget = float(budget.strip())
            except ValueError:
                raise ValueError(
                    f"budget {given!r} is not a number: give a fraction in (0, 1] of the parent's "
                    f"{parent_parameters:,} non-embedding parameters, or a size with a unit such as '3B' or '350M'"
                ) from None
    budget = float(budget)
    if budget > 1.0 and math.isfinite(budget):
        raise ValueError(
            f"budget {given!r} is outside (0, 1]: a number is the fraction of the parent's {parent_parameters:,} "
            f"non-embedding parameters to keep; for a size, give a unit, such as '{_example_size(parent_parameters)}'"
        )
    if not (0.0 < budget <= 1.0):  # (NaN fails this too)
        raise ValueError(
            f"budget {given!r} is outside (0, 1]: it is the fraction of the parent's "
            f"{parent_parameters:,} non-embedding parameters to keep"
        )
    return budget


def _example_size(parameters: int) -> str:
    """Half of `parameters` written with a unit ("150M"), for error messages."""
    half = parameters / 2
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if half >= scale:
            return f"{half / scale:.3g}{unit}"
    return "150M"


@strict
class LlamaFlexConfig(LlamaConfig):
    r"""
    Configuration of a LlamaFlex model: a Llama parent (all of `LlamaConfig`'s fields) plus its elastic axes.

    Args:
        hidden_choices (`list[int]`): residual-stream widths a sub-model may take, increasing; the last is
            `hidden_size`.
        head_choices (`list[int]`): total query heads a sub-model may keep, each a multiple of
            `num_key_value_heads` (the same number is kept in every KV group); the last is `num_attention_heads`.
        mlp_choices (`list[int]`): MLP intermediate widths, increasing; the last is `intermediate_size`.
        depth_choices (`list[int]`): numbers of layers, increasing; the last is `num_hidden_layers`.
        layer_ranking (`list[int]`): layer indices from most to least important; depth `k` keeps the first
            `k` of them, run in their original order. Identity by default.
        budgets (`list[float]`): the budgets trained on (fractions of the parent's non-embedding parameters).
        router_embed_dim, router_hidden_dim (`int`): size of the shared budget embedding and of the hidden
            layer of each axis's router MLP (paper: 128 and 128).
        router_budget_embedding (`str`): the routers' input: "sinusoidal" (low-frequency features of the scalar
            budget) or "onehot" (Flextron: a one-hot over the trained budgets and 1; a budget between two of
            them gets the linear blend of their one-hots).
        modulation_embed_dim, modulation_hidden_dim (`int`): size of the sinusoidal choice embedding and of
            the hidden layer of each modulation network (paper: 16 and 128).
        use_modulation (`bool`): build the policy-aware modulation networks.
        budget_tolerance (`float`): relative slack on the parameter budget (router loss and architecture
            search).
        architecture_scores (`dict`, *optional*): what conversion measured to rank architectures by quality
            (`search.score_architectures`): the metric, the parent's score, the cost of each single-axis cut and
            the measured loss of every scored candidate. `architecture(b)` uses it without data at load time.
        hidden_norm_gains (`list[list[float]]`, *optional*): per hidden choice (aligned with `hidden_choices`), a
            gain for each RMSNorm (layer l's input norm at 2l, its post-attention norm at 2l + 1, the final norm
            last), measured at conversion: a sub-model's norm divides by the RMS of its kept channels only, which
            is larger than the parent's when the dropped channels carry little energy; the gain (the mean over
            calibration tokens of RMS(kept) / RMS(all)) gives the norm outputs back the parent's scale. Folded
            into the norm weights at export; 1 for the full width. None: no correction.
        budget (`float | str`, *optional*): the active budget. None means the full model. When set at load
            time (`from_pretrained(..., budget=0.5)`) the returned model holds only that sub-model.
        elastic (`bool`): False for a model that holds one sub-model only (loaded at a budget); it has no
            routers and no modulation (folded into its weights).
    """

    model_type = "llamaflex"
    # No tensor-parallel plan: Llama's shards q/k/v/o and the MLP by rows or columns, but an `ElasticLinear`
    # keeps a *prefix* of its weight, which a shard is not. `from_pretrained(tp_plan=...)` is refused.
    base_model_tp_plan = None

    hidden_choices: list[int] | None = None
    head_choices: list[int] | None = None
    mlp_choices: list[int] | None = None
    depth_choices: list[int] | None = None
    layer_ranking: list[int] | None = None
    budgets: list[float] | None = None
    router_embed_dim: int = 128
    router_hidden_dim: int = 128
    router_budget_embedding: str = "sinusoidal"
    modulation_embed_dim: int = 16
    modulation_hidden_dim: int = 128
    use_modulation: bool = True
    budget_tolerance: float = 0.05
    architecture_scores: dict | None = None
    hidden_norm_gains: list[list[float]] | None = None
    budget: float | int | str | None = None
    elastic: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        defaults = default_choices(self)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.layer_ranking is None:
            self.layer_ranking = list(range(self.num_hidden_layers))
        if self.budgets is None:
            self.budgets = [0.5, 0.625, 0.75, 0.875]
        self.budgets = sorted(self._parse_budgets(self.budgets))

    def _parse_budgets(self, budgets) -> list[float]:
        """`budgets` as fractions: a list of numbers in (0, 1] or of sizes such as '350M' (read by parse_budget)."""
        if not isinstance(budgets, (list, tuple)):
            raise ValueError(
                f"budgets must be a list of budgets (fractions in (0, 1] or sizes such as '350M'), got {budgets!r} "
                f"({type(budgets).__name__}); for one budget, give [{budgets!r}]"
            )
        if not budgets:
            raise ValueError("budgets is empty: give at least one budget to train on, such as [0.5, 0.75]")
        parsed = []
        for i, b in enumerate(budgets):
            if isinstance(b, bool) or not isinstance(b, (int, float, str)):
                raise ValueError(
                    f"budgets[{i}] is {b!r} ({type(b).__name__}): every budget must be a fraction in (0, 1] or a "
                    f"size such as '350M'"
                )
            if isinstance(b, str):
                try:
                    b = parse_budget(b, self.parent_parameters())
                except ValueError as err:
                    raise ValueError(f"budgets[{i}]: {err}") from None
            parsed.append(float(b))
        return parsed

    # ---- validation (run by @strict after __post_init__) ----
    def validate_elastic_axes(self):
        """Refuse choices a sub-model cannot have, naming the field and the allowed values."""
        parent = {
            "hidden_choices": ("hidden_size", self.hidden_size),
            "head_choices": ("num_attention_heads", self.num_attention_heads),
            "mlp_choices": ("intermediate_size", self.intermediate_size),
            "depth_choices": ("num_hidden_layers", self.num_hidden_layers),
        }
        for name, (parent_name, full) in parent.items():
            choices = getattr(self, name)
            if not choices or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in choices):
                raise ValueError(
                    f"{name} must be a non-empty list of positive integers (True and False are not sizes), "
                    f"got {choices}"
                )
            if list(choices) != sorted(set(choices)):
                raise ValueError(f"{name} must be strictly increasing, got {choices}")
            if choices[-1] != full:
                raise ValueError(
                    f"{name} must end with the parent's {parent_name}={full} and hold nothing larger, got {choices}"
                )
        n_kv = self.num_key_value_heads
        bad = [c for c in self.head_choices if c % n_kv]
        if bad:
            raise ValueError(
                f"head_choices {bad} are not multiples of num_key_value_heads={n_kv}: every KV group keeps the "
                f"same number of query heads, so allowed values are {[n_kv * k for k in range(1, self.num_attention_heads // n_kv + 1)]}"
            )
        invalid = [(h, q) for h in self.hidden_choices for q in self.head_choices if h % q]
        if invalid:
            pairs = ", ".join(f"hidden {h} with {q} heads" for h, q in invalid[:6]) + (" ..." if len(invalid) > 6 else "")
            raise ValueError(
                f"hidden_choices {self.hidden_choices} and head_choices {self.head_choices} combine into sub-models "
                f"that cannot be exported as a plain LlamaConfig ({pairs}): transformers requires hidden_size to be "
                f"a multiple of num_attention_heads. Use hidden choices that every head choice divides (multiples "
                f"of {math.lcm(*self.head_choices)}), or drop the head choices that do not divide them"
            )
        if sorted(self.layer_ranking) != list(range(self.num_hidden_layers)):
            raise ValueError(
                f"layer_ranking must be a permutation of 0..{self.num_hidden_layers - 1}, got {self.layer_ranking}"
            )
        bad_budgets = [b for b in self.budgets if not 0.0 < b <= 1.0]
        if bad_budgets:
            raise ValueError(f"budgets {bad_budgets} are outside (0, 1]; budgets are fractions of the parent's size")
        twice = sorted({b for b in self.budgets if self.budgets.count(b) > 1})
        if twice:
            raise ValueError(f"budgets {self.budgets} hold {twice} more than once: give each budget once")
        if self.elastic:
            from .architecture import smallest_budget

            low = smallest_budget(self)
            unreachable = [b for b in self.budgets if b < low]
            if unreachable:
                raise ValueError(
                    f"budgets {unreachable} cannot be reached: the smallest sub-model these choices allow keeps "
                    f"{low:.4f} of the parent; allowed budgets are [{low:.4f}, 1]"
                )
        if self.hidden_norm_gains is not None:
            rows, norms = len(self.hidden_norm_gains), 2 * self.num_hidden_layers + 1
            if rows != len(self.hidden_choices) or any(len(g) != norms for g in self.hidden_norm_gains):
                raise ValueError(
                    f"hidden_norm_gains must hold one list of {norms} gains (2 per layer + the final norm) per hidden "
                    f"choice ({len(self.hidden_choices)}: {self.hidden_choices}), got {rows} lists of lengths "
                    f"{sorted({len(g) for g in self.hidden_norm_gains})}"
                )
            if any(g != 1.0 for g in self.hidden_norm_gains[-1]):
                raise ValueError("hidden_norm_gains of the full width (the last row) must all be 1.0: the parent is "
                                 "never rescaled")
        if not 0.0 <= self.budget_tolerance < 1.0:
            raise ValueError(f"budget_tolerance must be in [0, 1), got {self.budget_tolerance}")
        for name in ("router_embed_dim", "router_hidden_dim", "modulation_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.router_embed_dim % 2:
            raise ValueError(
                f"router_embed_dim must be even (the sinusoidal budget embedding has a sine and a cosine per "
                f"frequency), got {self.router_embed_dim}; use {self.router_embed_dim + 1}, for example"
            )
        if self.router_budget_embedding not in ("sinusoidal", "onehot"):
            raise ValueError(f"router_budget_embedding must be 'sinusoidal' or 'onehot', got {self.router_budget_embedding!r}")
        if self.modulation_embed_dim < 2 or self.modulation_embed_dim % 2:
            raise ValueError(f"modulation_embed_dim must be a positive even number, got {self.modulation_embed_dim}")
        if self.budget is not None and self.elastic:
            from .architecture import smallest_budget

            value = parse_budget(self.budget, self.parent_parameters())
            low = smallest_budget(self)
            if value < low:
                raise ValueError(
                    f"budget {self.budget!r} cannot be reached: the smallest sub-model these choices allow keeps "
                    f"{low:.4f} of the parent; allowed budgets are [{low:.4f}, 1]"
                )

    # ---- helpers ----
    @property
    def choices(self) -> dict[str, list[int]]:
        """The choices of every axis, keyed by axis name."""
        return {
            "hidden": list(self.hidden_choices),
            "heads": list(self.head_choices),
            "mlp": list(self.mlp_choices),
            "depth": list(self.depth_choices),
        }

    def parent_parameters(self) -> int:
        """Non-embedding parameters of the parent (closed form: `architecture.count_parameters`)."""
        from .architecture import count_parameters

        return count_parameters(
            self, self.hidden_size, self.num_attention_heads, self.intermediate_size, self.num_hidden_layers
        )

    @classmethod
    def from_llama_config(cls, llama_config: LlamaConfig, **elastic) -> LlamaFlexConfig:
        """A flex config for a Llama parent, with default choices unless given in `elastic`."""
        if getattr(llama_config, "model_type", None) not in ("llama", "llamaflex"):
            raise ValueError(
                f"LlamaFlex needs a Llama-shaped parent (model_type 'llama'), got model_type "
                f"{getattr(llama_config, 'model_type', None)!r}"
            )
        # (a parent loaded from a GGUF is de-quantised: its quantization_config describes no weight we hold)
        data = model_fields(llama_config.to_dict())
        data.update(elastic)
        return cls(**data)

    def to_llama_config(self, **sizes) -> LlamaConfig:
        """The plain LlamaConfig of the parent, or of a sub-model when sizes are given."""
        data = {k: v for k, v in model_fields(self.to_dict()).items() if k not in _FLEX_FIELDS}
        data.update(sizes)
        data["head_dim"] = self.head_dim
        data["architectures"] = ["LlamaForCausalLM"]
        return LlamaConfig(**data)


FILE_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config")
"""Keys of a saved config that describe its file (class, code, version, stored weight format), not the model:
dropped whenever one config is built from another."""


def model_fields(data: dict) -> dict:
    """A config dict without its `FILE_FIELDS`."""
    return {k: v for k, v in data.items() if k not in FILE_FIELDS}


_FLEX_FIELDS = {
    "hidden_choices", "head_choices", "mlp_choices", "depth_choices", "layer_ranking", "budgets",
    "router_embed_dim", "router_hidden_dim", "router_budget_embedding", "modulation_embed_dim", "modulation_hidden_dim",
    "use_modulation", "budget_tolerance", "budget", "elastic", "architecture_scores",
    "hidden_norm_gains",
}

__all__ = ["LlamaFlexConfig", "AXES", "default_choices", "parse_budget"]
