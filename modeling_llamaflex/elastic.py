"""The elastic building blocks (docs/design.md, "Nested weights").

* `ElasticLinear` slices its *own* weight inside its own forward: the input width is read off the
  activation, the output width is asked for. Query-head projections keep a prefix *within each KV group*,
  through a (groups, per_group, ...) view, so grouped-query attention survives every cut.
* `ElasticRMSNorm` normalises over the active channels only (sliced mode), or over a soft-masked full
  width with the expected active width ĥ (masked mode).
* `ElasticState` is what every layer of one forward needs. Inference builds it from an `Architecture` (the
  one public representation of a sub-model); training builds it from a `Policy`, the routers' per-axis choice
  probabilities (soft: staircase masks over the full width; hard: one-hot, sliced, gradients through the gates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import Architecture, make_architecture
from .configuration_llamaflex import AXES, LlamaFlexConfig


def slice_dim(tensor: torch.Tensor, dim: int, size: int | None, groups: int = 1) -> torch.Tensor:
    """Keep the first `size` entries along `dim`, or the first `size // groups` of each of `groups` blocks."""
    full = tensor.shape[dim]
    if size is None or size == full:
        return tensor
    if groups == 1:
        return tensor.narrow(dim, 0, size)
    shape = list(tensor.shape)
    grouped = tensor.reshape(*shape[:dim], groups, full // groups, *shape[dim + 1 :])
    kept = grouped.narrow(dim + 1, 0, size // groups)
    return kept.reshape(*shape[:dim], size, *shape[dim + 1 :])


class ElasticLinear(nn.Linear):
    """An `nn.Linear` that uses the top-left block of its weight: `W[:out, :in]`.

    `in_groups`/`out_groups` > 1 make the kept block a prefix within each of that many equal groups of
    columns/rows (query heads inside KV groups). The input width is taken from `x`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, in_groups: int = 1, out_groups: int = 1):
        super().__init__(in_features, out_features, bias=bias)
        self.in_groups, self.out_groups = in_groups, out_groups

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        weight = slice_dim(self.weight, 0, out_features, self.out_groups)
        weight = slice_dim(weight, 1, x.shape[-1], self.in_groups)
        bias = None if self.bias is None else slice_dim(self.bias, 0, out_features, self.out_groups)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", in_groups={self.in_groups}, out_groups={self.out_groups}"


class ElasticRMSNorm(nn.Module):
    """Llama's RMSNorm over the active width.

    Sliced mode: `x` holds only the active channels; the weight is sliced to match. Masked mode: `x` is
    full width with masked channels; `width_scale` = H/ĥ corrects the mean of squares to the active width.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, width_scale: torch.Tensor | None = None,
                gain: torch.Tensor | None = None) -> torch.Tensor:
        """`gain`: the sub-model's norm gain (`config.hidden_norm_gains`), folded into the weight as at export."""
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        if width_scale is not None:
            variance = variance * width_scale
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        weight = self.weight[: x.shape[-1]]
        if gain is not None:
            weight = (weight.float() * gain.float()).to(weight.dtype)
        return weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def staircase(probs: torch.Tensor, choices: list[int], size: int) -> torch.Tensor:
    """Soft staircase mask m = Σ_i π_i·[arange(size) < c_i]."""
    steps = torch.arange(size, device=probs.device)[None, :] < torch.tensor(choices, device=probs.device)[:, None]
    return probs @ steps.to(probs.dtype)


@dataclass
class Policy:
    """Per-axis choice probabilities for one training forward (from the routers, or one-hot for tests).

    `sliced=True` needs one-hot probabilities (hard or argmax samples): the model then runs the chosen
    sub-model's shapes, and the one-hot entries (value 1, possibly carrying straight-through gradients)
    gate the outputs. `sliced=False` runs the full width under soft staircase masks.
    """

    probs: dict[str, torch.Tensor]
    sliced: bool

    @property
    def indices(self) -> dict[str, int]:
        return {axis: int(self.probs[axis].argmax()) for axis in AXES}

    @classmethod
    def one_hot(cls, config: LlamaFlexConfig, indices: dict[str, int], sliced: bool = True, device=None, dtype=torch.float32) -> Policy:
        probs = {
            axis: F.one_hot(torch.tensor(indices[axis], device=device), len(config.choices[axis])).to(dtype)
            for axis in AXES
        }
        return cls(probs, sliced)


class ElasticState:
    """What every layer needs for one forward, computed once per forward.

    Sliced mode (`for_architecture`, or a hard policy): integer widths, the kept layers, and scalar gates
    (the chosen one-hot entry of a hard policy, or None when it carries no gradient). Masked mode (a soft
    policy): staircase masks, H/ĥ for the norms, per-layer keep weights.
    """

    gains: torch.Tensor | None = None  # (2, L) modulation gains, set by the model
    norm_gains: torch.Tensor | None = None  # (2L + 1,) RMSNorm gains of the hidden width, set by the model

    @classmethod
    def for_architecture(cls, arch: Architecture) -> ElasticState:
        """The sliced state of one sub-model, with no gates: what inference runs."""
        state = cls.__new__(cls)
        state._set_sliced(arch, dict.fromkeys(AXES))
        return state

    def __init__(self, config: LlamaFlexConfig, policy: Policy):
        probs, choices = policy.probs, config.choices
        if policy.sliced:
            gates = {a: probs[a][i] if probs[a].requires_grad else None for a, i in policy.indices.items()}
            self._set_sliced(make_architecture(config, policy.indices), gates)
            return
        n_kv = config.num_key_value_heads
        per_group = config.num_attention_heads // n_kv
        self.sliced = False
        self.hidden = self.heads = self.mlp = None
        self.kept_layers = list(range(config.num_hidden_layers))
        self.hidden_mask = staircase(probs["hidden"], choices["hidden"], config.hidden_size)
        expected_width = probs["hidden"] @ torch.tensor(choices["hidden"], dtype=probs["hidden"].dtype, device=probs["hidden"].device)
        self.width_scale = config.hidden_size / expected_width
        per_group_choices = [c // n_kv for c in choices["heads"]]
        self.head_mask = staircase(probs["heads"], per_group_choices, per_group).repeat(n_kv)[:, None]
        self.mlp_mask = staircase(probs["mlp"], choices["mlp"], config.intermediate_size)
        keep = staircase(probs["depth"], choices["depth"], config.num_hidden_layers)  # by rank position
        position = {layer: pos for pos, layer in enumerate(config.layer_ranking)}
        self.layer_weight = {layer: keep[position[layer]] for layer in self.kept_layers}

    def _set_sliced(self, arch: Architecture, gates: dict[str, torch.Tensor | None]) -> None:
        self.sliced = True
        self.hidden, self.heads, self.mlp = arch.hidden, arch.heads, arch.mlp
        self.kept_layers = list(arch.kept_layers)
        self.hidden_mask, self.head_mask, self.mlp_mask = gates["hidden"], gates["heads"], gates["mlp"]
        self.width_scale = None
        self.layer_weight = {layer: gates["depth"] for layer in self.kept_layers}

    def norm_gain(self, index: int) -> torch.Tensor | None:
        """The gain of RMSNorm `index` (2l: layer l's input norm, 2l + 1: its post-attention norm, 2L: the last)."""
        return None if self.norm_gains is None else self.norm_gains[index]

    def branch_scale(self, layer: int, branch: int) -> torch.Tensor | None:
        """Product of the modulation gain and the layer's keep weight for one residual branch."""
        scale = self.layer_weight[layer]
        if self.gains is not None:
            gain = self.gains[branch, layer]
            scale = gain if scale is None else gain * scale
        return scale


def norm_gains(config: LlamaFlexConfig, hidden: int | torch.Tensor, device=None) -> torch.Tensor | None:
    """(2L + 1,) RMSNorm gains (`config.hidden_norm_gains`) of hidden choice `hidden` (an index), or their
    π-weighted mean for choice probabilities `hidden`; None without gains or at the full width."""
    table = config.hidden_norm_gains
    if table is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.float() @ torch.tensor(table, dtype=torch.float32, device=hidden.device)
    if hidden == len(table) - 1:
        return None
    return torch.tensor(table[hidden], dtype=torch.float32, device=device)


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


__all__ = ["ElasticLinear", "ElasticRMSNorm", "ElasticState", "Policy", "apply_mask", "norm_gains", "slice_dim", "staircase"]
