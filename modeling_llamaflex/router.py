"""Budget routers (docs/design.md, "Routers"): budget → one architecture choice per axis.

A shared embedding E(b) of the scalar budget (sinusoidal features, or Flextron's one-hot over the trained budgets
blended linearly between neighbours; then a learned layer), then per axis a
2-layer MLP giving logits over that axis's choices. Training samples with Gumbel-Softmax at temperature τ
on logits scaled by κ (soft, or hard with a straight-through one-hot); inference takes the argmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_llamaflex import AXES, LlamaFlexConfig


def sinusoidal(x: torch.Tensor, dim: int, max_frequency: float = 1000.0) -> torch.Tensor:
    """[sin(x·ω_k), cos(x·ω_k)] with ω_k log-spaced in [1, max_frequency]; x in [0, 1] (any shape)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), half, device=x.device, dtype=torch.float32))
    angles = x.to(torch.float32)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# Low frequencies only: nearby budgets get nearby embeddings, so the routers interpolate between the
# budgets they were trained on (a frequency of 10 rad per unit budget resolves steps of a few percent).
BUDGET_MAX_FREQUENCY = 10.0


def budget_blend(budget: torch.Tensor, anchors: list[float]) -> torch.Tensor:
    """Flextron's router input: the one-hot of `budget` over the sorted `anchors` (the trained budgets and 1); a
    budget between two anchors gets the linear blend of their one-hots, one outside them the nearest's one-hot."""
    points = torch.tensor(anchors, dtype=torch.float32, device=budget.device)
    b = budget.to(torch.float32).reshape(()).clamp(points[0], points[-1])
    upper = int(torch.searchsorted(points, b.detach()).clamp(1, len(anchors) - 1)) if len(anchors) > 1 else 0
    out = torch.zeros(len(anchors), dtype=torch.float32, device=budget.device)
    if len(anchors) == 1:
        return out + 1.0
    lo, hi = points[upper - 1], points[upper]
    w = (b - lo) / (hi - lo)
    out = out.index_put((torch.tensor(upper - 1, device=budget.device),), 1.0 - w)
    return out.index_put((torch.tensor(upper, device=budget.device),), w, accumulate=True)


class BudgetRouter(nn.Module):
    """Shared budget embedding plus one logit MLP per elastic axis."""

    def __init__(self, config: LlamaFlexConfig):
        super().__init__()
        e, h = config.router_embed_dim, config.router_hidden_dim
        self.embed_dim = e
        self.mode = config.router_budget_embedding
        self.anchors = sorted(set(float(b) for b in (config.budgets or [])) | {1.0})
        self.embed = nn.Linear(len(self.anchors) if self.mode == "onehot" else e, e)
        self.heads = nn.ModuleDict(
            {axis: nn.Sequential(nn.Linear(e, h), nn.SiLU(), nn.Linear(h, len(config.choices[axis]))) for axis in AXES}
        )
        for head in self.heads.values():  # untrained routers have no preference: uniform choice logits
            head[-1]._zero_init = True
        for layer in [self.embed] + [head[0] for head in self.heads.values()]:
            layer._fan_in_init = True  # unit-variance features, so the budget is visible to the heads from step 0
        # optimizer steps these weights were trained for (FlexTrainer counts them). Kept with the weights, so that
        # it travels wherever they go (checkpoints, PEFT adapters); 0: the routers do not choose architectures.
        self.register_buffer("trained_steps", torch.zeros(1, dtype=torch.long))  # shape (1,): readable by row

    def forward(self, budget: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per axis for a scalar budget tensor."""
        return self.from_features(self.features(budget))

    def features(self, budget: torch.Tensor) -> torch.Tensor:
        """The router's input for a scalar budget: sinusoidal features, or the one-hot blend over the anchors."""
        dtype = self.embed.weight.dtype
        if self.mode == "onehot":
            return budget_blend(budget, self.anchors).to(dtype)
        return sinusoidal(budget.reshape(()), self.embed_dim, max_frequency=BUDGET_MAX_FREQUENCY).to(dtype)

    def from_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per axis from `features` (..., input): a stack of budgets' features gives a stack of logits."""
        shared = F.silu(self.embed(features))
        return {axis: normalize_logits(head(shared)) for axis, head in self.heads.items()}


def routers_trained(module: nn.Module) -> bool:
    """True if any `BudgetRouter` in `module` (a router, or PEFT's wrapper around one) has been trained."""
    return any(int(m.trained_steps) > 0 for m in module.modules() if isinstance(m, BudgetRouter))


def normalize_logits(raw: torch.Tensor) -> torch.Tensor:
    """Centre the logits and bound their spread, (l − mean) / sqrt(var + 1), so that only the logit scale κ
    (a schedule) makes the choice sharp. Unbounded logits saturate the softmax within a few hundred steps at the
    paper's learning rate, and the budget loss then has no gradient left to move a wrong choice."""
    centred = raw - raw.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1.0)


def gumbel_softmax(
    logits: torch.Tensor,
    temperature: float,
    logit_scale: float = 1.0,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gumbel-Softmax over κ·logits at temperature τ; `hard` returns a straight-through one-hot.

    The noise comes from `generator` (a CPU generator seeded from the global step in training, so every
    rank draws the same architecture).
    """
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32).clamp_(1e-9, 1 - 1e-9)
    noise = -torch.log(-torch.log(uniform)).to(device=logits.device, dtype=logits.dtype)
    soft = F.softmax((logits * logit_scale + noise) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


__all__ = ["BudgetRouter", "budget_blend", "gumbel_softmax", "routers_trained", "sinusoidal"]
