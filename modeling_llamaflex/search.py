"""Architectures ranked by measured quality, and routers that start from them (docs/design.md, "Routers").

As Minitron's NAS does, the candidates within a budget's tolerance are ranked and the top k are scored on
calibration data (here by the distillation loss to the parent); the best is kept. Ours ranks by a *predicted*
score rather than by size: the sum of the measured costs of each axis's cut on its own (one forward per choice), which sends the scoring to the
cuts that hurt least (cutting a third of SmolLM2's heads costs 2.5 nats, its MLP to the same size 0.3).
`score_architectures` returns what was measured; conversion stores it in `config.architecture_scores`, so
`architecture(b)` needs no data at load time (`architecture.search_architecture`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .architecture import candidates, full_architecture, index_key, make_architecture, predicted_loss, search_architecture
from .configuration_llamaflex import AXES
from .importance import calibration_batches
from .lora import active_copy

logger = logging.getLogger(__name__)


@torch.no_grad()
def _kl_to_parent(flex, batches, parent_logprobs: list[torch.Tensor] | None, indices: dict[str, int] | None):
    """Mean KL(parent ‖ sub-model) per token of the sub-model `indices` (None: the full model), sliced.

    With `parent_logprobs` None, returns the full model's log-probabilities per batch instead (the reference).
    """
    device = flex.model.embed_tokens.weight.device
    arch = None if indices is None else make_architecture(flex.config, indices)
    total, count, out = 0.0, 0, []
    for b, (ids, mask) in enumerate(batches):
        ids = ids.to(device)
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        logprobs = F.log_softmax(flex(input_ids=ids, attention_mask=mask, architecture=arch, use_cache=False).logits.float(), -1)
        if parent_logprobs is None:
            out.append(logprobs)
            continue
        ref = parent_logprobs[b]
        kl = (ref.exp() * (ref - logprobs)).sum(-1)
        total += float((kl * mask).sum())
        count += int(mask.sum())
    return out if parent_logprobs is None else total / max(count, 1)


def default_score_budgets(config) -> list[float]:
    """The trained budgets and the midpoints between neighbours (what the eval's interpolated budgets are)."""
    budgets = sorted(b for b in config.budgets if b < 1)
    mids = [(a + b) / 2 for a, b in zip(budgets, budgets[1:] + [1.0])]
    return sorted(set(budgets) | set(mids))


def score_architectures(flex, data, budgets: list[float] | None = None, top_k: int = 8, batch_size: int = 8,
                        progress: bool = True, compensation=None) -> dict:
    """Measure the candidates of `budgets` on `data` (token ids, as for calibration); returns the scores.

    The score is the distillation loss to the parent, KL(parent ‖ sub-model) in nats per token: 0 for a cut
    that changes nothing, whatever the data (a next-token loss can prefer a damaged model by chance on a few
    thousand tokens).
    1. the KL of every single-axis cut (the other axes full);
    2. for each budget, the candidates within tolerance ranked by predicted loss; the top `top_k` are
       measured (each combination once, whatever the number of budgets it serves).
    The result is JSON-serialisable: {"metric", "tokens", "parent" (0: the parent's own KL), "axis_costs",
    "scored" ({"h,q,f,d" choice indices: KL}), "budgets", "top_k"}.
    With a `compensation.Compensation`, every sub-model is scored compensated (`Compensation.score`).
    """
    config = flex.config
    batches = list(calibration_batches(data, batch_size))
    tokens = sum(int(ids.numel() if mask is None else mask.sum()) for ids, mask in batches)
    budgets = default_score_budgets(config) if budgets is None else sorted(set(float(b) for b in budgets))
    was_training = flex.training
    flex.eval()
    full = {a: len(config.choices[a]) - 1 for a in AXES}
    cuts = [(a, i) for a in AXES for i in range(len(config.choices[a]) - 1)]
    bar = tqdm(total=1 + len(cuts), desc="scoring single-axis cuts", disable=not progress)
    reference = _kl_to_parent(flex, batches, None, None)
    bar.update()
    costs = {a: [0.0] * len(config.choices[a]) for a in AXES}
    scored: dict[str, float] = {index_key(full): 0.0}

    def measure(idx: dict[str, int]) -> float:
        if compensation is None:
            return _kl_to_parent(flex, batches, reference, idx)
        with compensation.applied(flex, make_architecture(config, idx)):
            return _kl_to_parent(flex, batches, reference, idx)

    for axis, i in cuts:
        idx = dict(full, **{axis: i})
        costs[axis][i] = scored[index_key(idx)] = measure(idx)
        bar.update()
    bar.close()
    metric = "kl_to_parent" if compensation is None else "kl_to_parent (compensated)"
    result = {"metric": metric, "tokens": tokens, "parent": 0.0, "axis_costs": costs, "scored": scored,
              "budgets": budgets, "top_k": top_k}
    config.architecture_scores = result  # predicted_loss reads it from the config
    todo = []
    for budget in budgets:
        ranked = sorted(candidates(config, budget), key=lambda ip: predicted_loss(config, ip[0]))
        todo += [idx for idx, _ in ranked[:top_k] if index_key(idx) not in scored and idx not in todo]
    todo.sort(key=lambda idx: (idx["mlp"], idx["heads"]))  # neighbours share compensated weights
    for idx in tqdm(todo, desc="scoring candidate architectures", disable=not progress):
        scored[index_key(idx)] = measure(idx)
    flex.train(was_training)
    return result


def format_scores(config, budgets: list[float] | None = None) -> str:
    """A table of the scored candidates of each budget (the chosen one first), for the convert command."""
    scores = config.architecture_scores or {}
    lines = [f"scored by {scores.get('metric')} (nats/token) on {scores.get('tokens', 0):,} calibration tokens"]
    for budget in budgets or scores.get("budgets", config.budgets):
        chosen, note = search_architecture(config, budget)
        lines.append(f"budget {budget:g}: {make_architecture(config, chosen)}  [{note}]")
        for idx, params in candidates(config, budget):
            loss = (scores.get("scored") or {}).get(index_key(idx))
            if loss is not None:
                arch = make_architecture(config, idx)
                mark = "*" if idx == chosen else " "
                lines.append(f"  {mark} {loss:.4f}  hidden={arch.hidden} heads={arch.heads} mlp={arch.mlp} "
                             f"depth={arch.depth} ({params / config.parent_parameters():.3f})")
    return "\n".join(lines)


# budgets between the smallest trained one and 1 that conversion (and refit_routers) fit the routers at: every
# 0.3% of the parent for trained budgets from 0.5, finer than any grid a family is evaluated on, so that a budget
# fitted nowhere lies within 0.16% of a fitted one and takes its architecture (bench/QUALITY.md: with 41 points the
# routers' own argmax missed 5 of 30 grid budgets on SmolLM2 straight after conversion, with 161 one; the fit is
# one batch, 1 to 2 seconds either way)
ROUTER_FIT_POINTS = 161


def router_fit_family(config, points: int = ROUTER_FIT_POINTS, trained: dict[float, dict[str, int]] | None = None) -> dict[float, dict[str, int]]:
    """What conversion fits the routers to: at each trained budget its architecture (`trained`, default the best
    measured within tolerance), and at `points` budgets evenly spaced from the smallest trained budget to 1 the
    best measured within *their* tolerance, so that the routers' own argmax between trained budgets is an
    architecture of the right size (a router fitted at the trained budgets only is a step function between
    them: bench/QUALITY.md). `points` 0: the trained budgets only."""
    budgets = sorted(b for b in config.budgets if b < 1)
    family = dict(trained) if trained is not None else {
        b: search_architecture(config, b, allow_smaller=False)[0] for b in budgets}
    for b in router_fit_budgets(budgets, points):
        if b not in family:
            family[b] = search_architecture(config, b, allow_smaller=False)[0]
    return family


def router_fit_budgets(budgets, points: int = ROUTER_FIT_POINTS) -> list[float]:
    """`points` budgets evenly spaced from the smallest of `budgets` below 1 to 1, 1 itself left out (it is the
    parent, which `fit_routers` always fits); none for `points` 0 or no budget below 1."""
    low = min((b for b in budgets if b < 1), default=None)
    if not points or low is None:
        return []
    return [round(low + (1 - low) * i / (points - 1), 6) for i in range(points - 1)]


def fit_routers(flex, architectures: dict[float, dict[str, int]], steps: int = 3000, lr: float = 1e-2,
                progress: bool = False, min_steps: int = 400, router=None) -> dict[float, bool]:
    """Initialise the routers so that their argmax at each budget is the given architecture's choice.

    Cross-entropy of each axis's (normalised) logits against the target index, Adam on the router only, all
    budgets in one batch, for at least `min_steps` and then until every argmax matches (checked every 100 steps)
    or `steps`; budget 1 maps to the full model. Returns, per budget, whether the argmax now matches on every axis. (41 budgets whose targets
    alternate between neighbouring depths took 400 to 1,000 steps on SmolLM2; a few seconds on a CPU.)
    `router`: fit this module instead of the model's own (a plain copy, where the model's is partitioned by ZeRO-3).
    """
    config = flex.config
    router = router if router is not None else active_copy(flex.model.router)  # under PEFT, the copy that runs
    targets = dict(architectures)
    targets.setdefault(1.0, full_architecture(config).indices)
    device = next(router.parameters()).device
    dtype = next(router.parameters()).dtype
    budgets = sorted(targets)
    tensors = {a: torch.tensor([targets[b][a] for b in budgets], device=device) for a in AXES}
    inputs = [torch.tensor(b, device=device, dtype=dtype) for b in budgets]
    with torch.no_grad():
        features = torch.stack([router.features(x) for x in inputs])  # (budgets, input): fixed, one batch
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)

    def matched() -> dict[float, bool]:
        with torch.no_grad():
            logits = router.from_features(features)
            hits = torch.stack([logits[a].argmax(-1) == tensors[a] for a in AXES]).all(0)
        return dict(zip(budgets, hits.tolist()))

    with torch.enable_grad():
        for step in tqdm(range(steps), desc="fitting routers", disable=not progress):
            if step >= min_steps and step % 100 == 0 and all(matched().values()):
                break
            logits = router.from_features(features)
            loss = sum(F.cross_entropy(logits[a].float() * 4.0, tensors[a]) for a in AXES)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return matched()


__all__ = ["ROUTER_FIT_POINTS", "default_score_budgets", "fit_routers", "format_scores", "router_fit_budgets", "router_fit_family",
           "score_architectures"]
