"""Policy-aware modulation (docs/design.md, "Modulation"): tiny networks that rescale the elastic branches.

For each axis a, M_a: sin_16(c / c_max) → Linear(16, 128) → SiLU → Linear(128, 2·L), last layer zero-initialised,
gives per-layer gains 1 + Δ for the attention (row 0) and MLP (row 1) branch outputs, with Δ = M_a(x) − M_a(x_full),
so that the full choice has gain exactly 1 (ours: the parent stays the parent, in training as at export). Soft
policies feed the π-weighted embedding of the choices. Gains of all axes multiply; at export they fold into o_proj/down_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_llamaflex import AXES, LlamaFlexConfig
from .router import sinusoidal


class AxisModulation(nn.Module):
    def __init__(self, config: LlamaFlexConfig, axis: str):
        super().__init__()
        self.choices = config.choices[axis]
        self.embed_dim = config.modulation_embed_dim
        self.num_layers = config.num_hidden_layers
        self.choice_embedding = nn.Buffer(self.make_table(), persistent=False)
        self.net = nn.Sequential(
            nn.Linear(config.modulation_embed_dim, config.modulation_hidden_dim),
            nn.SiLU(),
            nn.Linear(config.modulation_hidden_dim, 2 * config.num_hidden_layers),
        )
        self.net[-1]._zero_init = True  # a fresh model at any budget is exactly the sliced parent

    def make_table(self) -> torch.Tensor:
        """Sinusoidal embedding of every choice, relative to the largest: (n_choices, embed_dim)."""
        return sinusoidal(torch.tensor(self.choices, dtype=torch.float32) / self.choices[-1], self.embed_dim, 100.0)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """(2, L) gains 1 + Δ for choice probabilities `probs` of this axis."""
        embedding = probs.to(self.choice_embedding.dtype) @ self.choice_embedding
        both = torch.stack([embedding, self.choice_embedding[-1]]).to(self.net[0].weight.dtype)
        out = self.net(both)
        delta = out[0] - out[1]  # measured from the full choice: the parent itself is never modulated
        return 1.0 + delta.reshape(2, self.num_layers)


class PolicyModulation(nn.Module):
    """One `AxisModulation` per elastic axis; the gains multiply."""

    def __init__(self, config: LlamaFlexConfig):
        super().__init__()
        self.axes = nn.ModuleDict({axis: AxisModulation(config, axis) for axis in AXES})

    def for_indices(self, indices: dict[str, int]) -> torch.Tensor:
        """(2, L) gains of one architecture (its choice index per axis): a one-hot policy, no routers."""
        device = next(self.parameters()).device
        return self({a: F.one_hot(torch.tensor(indices[a], device=device), len(m.choices)).float() for a, m in self.axes.items()})

    def forward(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        gains = None
        for axis, module in self.axes.items():
            g = module(probs[axis])
            gains = g if gains is None else gains * g
        return gains


__all__ = ["AxisModulation", "PolicyModulation"]
