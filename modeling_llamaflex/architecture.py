"""Architectures: one choice per elastic axis, their parameter counts, the budget loss, and the search
over the (small) grid of choices that backs up the routers (docs/design.md, "Routers" and "Parameter count and budget loss")."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch

from .configuration_llamaflex import AXES, LlamaFlexConfig


def count_parameters(config: LlamaFlexConfig, hidden, heads, mlp, depth):
    """Non-embedding parameters of a uniform Llama with these sizes (closed form; docs/design.md, "Parameter count and budget loss").

    P = k·(2·h·n_q·d + 2·h·n_kv·d + 3·h·f + 2·h) + h, plus biases where the parent has them. Works on
    ints (exact count) and on tensors (expected count: pass each width's expectation under the routers;
    choices on different axes are independent, so the expectation of the product is the product of the
    expectations).
    """
    d, n_kv = config.head_dim, config.num_key_value_heads
    per_layer = 2 * hidden * heads * d + 2 * hidden * n_kv * d + 3 * hidden * mlp + 2 * hidden
    if config.attention_bias:
        per_layer = per_layer + heads * d + 2 * n_kv * d + hidden
    if config.mlp_bias:
        per_layer = per_layer + 2 * mlp + hidden
    return depth * per_layer + hidden


def exportable(config: LlamaFlexConfig, hidden: int, heads: int) -> bool:
    """transformers' LlamaConfig requires hidden_size to be a multiple of num_attention_heads."""
    return hidden % heads == 0


@dataclass
class Architecture:
    """One sub-model: a choice per axis, the layers it keeps, and its non-embedding parameter count."""

    hidden: int
    heads: int
    mlp: int
    depth: int
    kept_layers: tuple[int, ...]
    num_parameters: int
    budget: float | None = None
    target_parameters: int | None = None
    note: str = ""
    indices: dict[str, int] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("indices")
        data["kept_layers"] = list(self.kept_layers)
        return data

    def __str__(self) -> str:
        text = (
            f"hidden={self.hidden} heads={self.heads} mlp={self.mlp} depth={self.depth} "
            f"layers={list(self.kept_layers)} params={self.num_parameters:,}"
        )
        if self.target_parameters:
            text += f" (target {self.target_parameters:,}, budget {self.budget:g})"
        return text + (f" [{self.note}]" if self.note else "")


def make_architecture(config: LlamaFlexConfig, indices: dict[str, int], **info) -> Architecture:
    """The architecture that takes choice `indices[axis]` on every axis."""
    values = {axis: config.choices[axis][indices[axis]] for axis in AXES}
    kept = tuple(sorted(config.layer_ranking[: values["depth"]]))
    params = count_parameters(config, values["hidden"], values["heads"], values["mlp"], values["depth"])
    return Architecture(**values, kept_layers=kept, num_parameters=int(params), indices=dict(indices), **info)


def is_full(config: LlamaFlexConfig, indices: dict[str, int]) -> bool:
    """True for the parent's own architecture (the largest choice on every axis)."""
    return all(indices[axis] == len(config.choices[axis]) - 1 for axis in AXES)


def full_architecture(config: LlamaFlexConfig, **info) -> Architecture:
    return make_architecture(config, {axis: len(config.choices[axis]) - 1 for axis in AXES}, **info)


def exportable_grid(config: LlamaFlexConfig):
    """Every exportable combination of choices with its parameter count (the product space is small)."""
    choices = config.choices
    for combo in itertools.product(*(range(len(choices[a])) for a in AXES)):
        idx = dict(zip(AXES, combo))
        vals = {a: choices[a][i] for a, i in idx.items()}
        if exportable(config, vals["hidden"], vals["heads"]):
            yield idx, count_parameters(config, vals["hidden"], vals["heads"], vals["mlp"], vals["depth"])


def smallest_budget(config: LlamaFlexConfig) -> float:
    """The smallest budget any exportable architecture reaches, as a fraction of the parent."""
    return min(p for _, p in exportable_grid(config)) / config.parent_parameters()


def candidates(config: LlamaFlexConfig, budget: float) -> list[tuple[dict[str, int], int]]:
    """Exportable combinations within the budget tolerance, largest first."""
    target, tol = budget * config.parent_parameters(), config.budget_tolerance
    within = [(idx, p) for idx, p in exportable_grid(config) if abs(p / target - 1) <= tol]
    return sorted(within, key=lambda ip: (-ip[1], -ip[0]["depth"], -ip[0]["hidden"]))


def index_key(indices: dict[str, int]) -> str:
    """How a combination is named in `config.architecture_scores["scored"]`: its choice indices, "h,q,f,d"."""
    return ",".join(str(indices[a]) for a in AXES)


def measured_loss(config: LlamaFlexConfig, indices: dict[str, int]) -> float | None:
    """The loss conversion measured for this combination, if it was scored."""
    scores = config.architecture_scores or {}
    return (scores.get("scored") or {}).get(index_key(indices))


def scored_architectures(config: LlamaFlexConfig) -> list[tuple[dict[str, int], int, float]]:
    """Every combination measured at conversion: (choice indices, non-embedding parameters, score)."""
    out = []
    for key, loss in ((config.architecture_scores or {}).get("scored") or {}).items():
        idx = dict(zip(AXES, (int(i) for i in key.split(","))))
        values = {a: config.choices[a][i] for a, i in idx.items()}
        out.append((idx, int(count_parameters(config, values["hidden"], values["heads"], values["mlp"],
                                              values["depth"])), loss))
    return out


def predicted_loss(config: LlamaFlexConfig, indices: dict[str, int]) -> float | None:
    """The parent's score plus the measured cost of each axis's cut alone (additive: no interactions)."""
    scores = config.architecture_scores or {}
    costs = scores.get("axis_costs")
    if not costs:
        return None
    return scores["parent"] + sum(costs[a][indices[a]] for a in AXES)


def search_architecture(
    config: LlamaFlexConfig, budget: float, scores: dict[str, torch.Tensor] | None = None, allow_smaller: bool = True
) -> tuple[dict[str, int], str]:
    """The best combination within the budget tolerance, by measured quality (docs/design.md, "Routers").

    Within tolerance, in this order: the lowest loss measured at conversion (`config.architecture_scores`,
    Minitron-style: ranked by predicted loss, the top k scored; a smaller measured architecture is taken if it
    scored lower still, unless `allow_smaller` is False, so that a larger budget never gets a worse sub-model
    than a smaller one); else the lowest predicted loss (the parent's loss plus each axis's single-cut cost); else, without quality scores, the best router score (`scores`:
    log-probabilities), then the larger count, more layers, the wider residual stream. If nothing lies within
    tolerance, the largest combination under it. Returns the choice indices and a note naming the rule.
    """
    tol = config.budget_tolerance
    within = candidates(config, budget)

    def router(idx):
        return 0.0 if scores is None else round(float(sum(scores[a][i] for a, i in idx.items())), 6)

    if within:
        metric = (config.architecture_scores or {}).get("metric", "loss")
        measured = [(measured_loss(config, idx), -router(idx), i, idx) for i, (idx, _) in enumerate(within)]
        measured = [m for m in measured if m[0] is not None]
        if measured:
            # smaller architectures that measured better are allowed too: so that a larger budget is never
            # worse than a smaller one (its choice is always among a larger budget's options)
            target = budget * config.parent_parameters()
            keys = {index_key(idx) for idx, _ in within}
            smaller = [(loss, 0.0, len(within) + j, idx) for j, (idx, params, loss) in enumerate(scored_architectures(config))
                       if allow_smaller and params < target * (1 - tol) and index_key(idx) not in keys]
            loss, _, i, idx = min(measured + smaller, key=lambda m: m[:3])
            if i >= len(within):
                return idx, (f"lowest measured {metric} ({loss:.3f}): a smaller architecture scored at conversion "
                             f"beats the {len(measured)} scored of {len(within)} candidates within ±{tol:g}")
            return idx, (f"lowest measured {metric} ({loss:.3f}) of {len(measured)} scored of {len(within)} "
                         f"candidates within ±{tol:g}")
        predicted = [(predicted_loss(config, idx), -router(idx), i, idx) for i, (idx, _) in enumerate(within)]
        if predicted[0][0] is not None:
            loss, _, _, idx = min(predicted, key=lambda m: m[:3])
            return idx, (f"lowest predicted {metric} ({loss:.3f}, single-axis costs; none of the {len(within)} "
                         f"candidates within ±{tol:g} was measured)")
        best = max(enumerate(within), key=lambda iv: (router(iv[1][0]), -iv[0]))[1][0]
        rule = "best router score" if scores is not None else "largest (no quality scores)"
        return best, f"{rule} of {len(within)} candidates within ±{tol:g}"
    target = budget * config.parent_parameters()
    under = [(idx, p) for idx, p in exportable_grid(config) if p <= target * (1 + tol)]
    if not under:
        raise ValueError(
            f"budget {budget:g} cannot be reached: the smallest sub-model these choices allow keeps "
            f"{smallest_budget(config):.4f} of the parent; allowed budgets are [{smallest_budget(config):.4f}, 1]"
        )
    best = max(under, key=lambda ip: (ip[1], router(ip[0]), ip[0]["depth"], ip[0]["hidden"]))
    return best[0], f"nothing within ±{tol:g}: largest combination under the budget"


def architecture_for_logits(
    config: LlamaFlexConfig, budget: float, logits: dict[str, torch.Tensor], routers_trained: bool = True
) -> Architecture:
    """The sub-model for `budget` (docs/design.md, "Routers").

    Budget 1 is the parent. Routers that were never trained (`routers_trained` False: the router's
    `trained_steps` buffer is 0) do not choose: the one-shot family is `search_architecture`'s quality ranking. Trained routers choose by their
    argmax; if it misses the budget by more than the tolerance (or cannot be exported), the search replaces it
    and `note` says so. `note` always names the rule that chose.
    """
    target = int(round(budget * config.parent_parameters()))
    info = {"budget": budget, "target_parameters": target}
    if budget >= 1.0:
        return full_architecture(config, note="the parent (budget 1)", **info)
    if not routers_trained:
        indices, note = search_architecture(config, budget)
        return make_architecture(config, indices, note=f"one-shot (untrained routers): {note}", **info)
    arch = make_architecture(config, {a: int(logits[a].argmax()) for a in AXES}, note="router", **info)
    exact = budget * config.parent_parameters()  # not `target`: a tiny budget rounds it to 0
    if abs(arch.num_parameters / exact - 1) <= config.budget_tolerance and exportable(config, arch.hidden, arch.heads):
        return arch
    scores = {a: torch.log_softmax(logits[a].detach().float(), -1).cpu() for a in AXES}
    indices, note = search_architecture(config, budget, scores)
    pick = f"{arch.hidden}/{arch.heads}/{arch.mlp}/{arch.depth}"
    return make_architecture(config, indices, note=f"router pick {pick} (hidden/heads/mlp/depth, "
                             f"{arch.num_parameters:,} params) missed the budget; {note}", **info)


def expected_parameters(config: LlamaFlexConfig, probs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Differentiable expected non-embedding parameters under per-axis choice probabilities."""
    expect = {}
    for axis in AXES:
        values = torch.tensor(config.choices[axis], dtype=probs[axis].dtype, device=probs[axis].device)
        expect[axis] = (probs[axis] * values).sum()
    return count_parameters(config, expect["hidden"], expect["heads"], expect["mlp"], expect["depth"])


def budget_loss(config: LlamaFlexConfig, probs: dict[str, torch.Tensor], budget: float) -> torch.Tensor:
    """max(0, |P̂/(b·P) − 1| − tol); at b = 1 also pull every axis towards its full choice (docs/design.md, "Parameter count and budget loss")."""
    ratio = expected_parameters(config, probs) / (budget * config.parent_parameters())
    loss = torch.relu((ratio - 1).abs() - config.budget_tolerance)
    if budget >= 1.0:
        loss = loss + sum(1 - probs[axis][-1] for axis in AXES)
    return loss


__all__ = [
    "Architecture",
    "architecture_for_logits",
    "budget_loss",
    "candidates",
    "index_key",
    "measured_loss",
    "predicted_loss",
    "count_parameters",
    "expected_parameters",
    "full_architecture",
    "is_full",
    "make_architecture",
    "search_architecture",
    "smallest_budget",
]
