"""Least-squares compensation of an extracted sub-model (docs/design.md, "Compensation"; bench/QUALITY.md).

Nested widths share their weights, so the checkpoint cannot refit the kept columns of o_proj and down_proj for
every width: the full model would change. A sub-model extracted on its own can have them refitted, as
non-nested one-shot pruners do. For every kept layer, the columns of down_proj that read the kept MLP neurons
(and of o_proj that read the kept query heads) are refitted so that the layer's output on calibration tokens
stays as close as possible to the full width's:

    W' = W · C[:, K] · (C[K, K] + λ·mean(diag C[K, K])·I)⁻¹

with C the mean of a·aᵀ over tokens at the projection's input, measured once on the full model, and K the kept
units. A neuron's (a head's) activation does not depend on the others', so for a cut of the MLP (the heads)
alone this is the least-squares optimum on the calibration tokens; with the residual stream or the depth cut
too, the inputs are the full model's and the fit is an approximation. The sub-model stays a plain Llama of the
same shapes; only its weights change. Costs: one forward of the full model over the calibration data, and the
covariances (layers · (intermediate² + (heads · head_dim)²) fp32 values: 0.3 GB on SmolLM2-135M, 28 GB on Llama
3.1 8B) on the model's device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .architecture import Architecture, full_architecture, make_architecture, search_architecture
from .importance import device_batches
from .lora import has_peft_layers

logger = logging.getLogger(__name__)

RIDGE = 1e-4  # λ, relative to the mean of the kept units' variances; measured in bench/QUALITY.md ("Compensation")
MIN_TOKENS_PER_INPUT = 32  # fewer calibration tokens per input column than this: a warning (QUALITY.md)


@dataclass
class Compensation:
    """The input covariances of every layer's down_proj (`mlp`, (intermediate, intermediate)) and o_proj
    (`heads`, (heads · head_dim)²), means over `tokens` calibration tokens of the full model."""

    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    tokens: int
    ridge: float = RIDGE
    scores: dict | None = None  # the compensated candidates' KL to the parent (`score`), in search's layout
    _cache: dict | None = field(default=None, repr=False)  # while scoring: (layer, kind) -> (kept, refitted weight)

    @classmethod
    @torch.no_grad()
    def from_data(cls, flex, data, batch_size: int = 8, progress: bool = True, ridge: float = RIDGE) -> Compensation:
        """Run the full LlamaFlex model over `data` (token ids: a tensor of blocks, or a list of sequences, as
        for calibration) and keep the covariances."""
        refuse_adapted(flex)
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        layers = flex.model.layers
        sums = {"mlp": [None] * len(layers), "heads": [None] * len(layers)}
        mask_now: dict[str, torch.Tensor] = {}

        def watch(kind: str, l: int):
            def hook(module, args):
                a = args[0].float() * mask_now["mask"][..., None].float()
                a = a.reshape(-1, a.shape[-1])
                sums[kind][l] = a.T @ a if sums[kind][l] is None else sums[kind][l] + a.T @ a
            return hook

        hooks = []
        for l, layer in enumerate(layers):
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(watch("mlp", l)))
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(watch("heads", l)))
        was_training, tokens = flex.training, 0
        flex.eval()
        try:
            for ids, mask in device_batches(flex, data, batch_size, progress, desc="compensation statistics"):
                mask_now["mask"] = mask
                flex(input_ids=ids, attention_mask=mask, use_cache=False, architecture=full_architecture(flex.config))
                tokens += int(mask.sum())
        finally:
            for hook in hooks:
                hook.remove()
            flex.train(was_training)
        if tokens == 0:
            raise ValueError("compensation data holds no tokens")
        width = max(layers[0].mlp.down_proj.in_features, layers[0].self_attn.o_proj.in_features)
        if tokens < MIN_TOKENS_PER_INPUT * width:
            logger.warning("compensation statistics from %d tokens for projections of %d inputs: the least-squares fit "
                           "is better with at least %d (on SmolLM2, 65k tokens fit better than 16k: bench/QUALITY.md)",
                           tokens, width, MIN_TOKENS_PER_INPUT * width)
        return cls([s / tokens for s in sums["mlp"]], [s / tokens for s in sums["heads"]], tokens, ridge)

    def score(self, flex, data, budgets: list[float] | None = None, top_k: int = 8, batch_size: int = 8,
              progress: bool = True) -> dict:
        """Rank the architectures of `budgets` by the measured KL of their *compensated* sub-models, as conversion
        does for the plain slices (`search.score_architectures`), and keep the scores here: `architecture(b)`
        then picks the best compensated sub-model (compensation makes MLP cuts cheaper relative to depth and
        width cuts, so the best architecture can differ). The model's own scores are left as they are."""
        from .search import score_architectures

        self._cache = {}  # the weights do not change while scoring, and candidates come sorted by their widths
        try:
            with _own_scores_kept(flex.config):  # score_architectures stores what it measured in the config
                self.scores = score_architectures(flex, data, budgets, top_k, batch_size, progress, compensation=self)
        finally:
            self._cache = None
        return self.scores

    def architecture(self, flex, budget: float | str) -> Architecture:
        """The sub-model `extract(b, compensation=self)` cuts: the best compensated candidate when `score` was
        run, else `flex.architecture(b)`."""
        base = flex.architecture(budget)
        if self.scores is None or base.budget is None or base.budget >= 1:
            return base
        with _own_scores_kept(flex.config):
            flex.config.architecture_scores = self.scores  # the search reads the scores from the config
            indices, note = search_architecture(flex.config, base.budget)
        return make_architecture(flex.config, indices, budget=base.budget, target_parameters=base.target_parameters,
                                 note=f"compensated one-shot: {note}")

    @contextmanager
    def applied(self, flex, arch: Architecture) -> Iterator[None]:
        """Within the block, `flex`'s o_proj and down_proj hold `arch`'s compensated columns where `arch` reads
        them, so that the sliced forward at `arch` is the compensated sub-model; the weights are restored after."""
        kept = kept_inputs(flex.config, arch)
        saved = []
        try:
            with torch.no_grad():
                for layer in arch.kept_layers:
                    block = flex.model.layers[layer]
                    for kind, module in (("mlp", block.mlp.down_proj), ("heads", block.self_attn.o_proj)):
                        refitted = self.refit(module.weight, layer, kind, kept[kind])
                        if refitted is module.weight:  # nothing cut on this input
                            continue
                        cols = kept[kind].to(module.weight.device)
                        saved.append((module.weight, cols, module.weight[: arch.hidden, cols].clone(), arch.hidden))
                        module.weight[: arch.hidden, cols] = refitted[: arch.hidden]
            yield
        finally:
            with torch.no_grad():
                for weight, cols, old, rows in reversed(saved):
                    weight[:rows, cols] = old

    def refit(self, weight: torch.Tensor, layer: int, kind: str, kept: torch.Tensor) -> torch.Tensor:
        """(rows, len(kept)): the least-squares columns for the kept inputs `kept` of `weight` (rows, all
        inputs), the projection of `kind` ("mlp": down_proj, "heads": o_proj) in parent layer `layer`."""
        covariance = getattr(self, kind)[layer].to(weight.device, torch.float64)
        kept = kept.to(weight.device)
        if len(kept) == covariance.shape[0]:
            return weight
        cached = None if self._cache is None else self._cache.get((layer, kind))
        if cached is not None and torch.equal(cached[0], kept):
            return cached[1]
        c_kk = covariance[kept][:, kept]
        c_kk = c_kk + self.ridge * torch.diagonal(c_kk).mean() * torch.eye(len(kept), dtype=c_kk.dtype, device=c_kk.device)
        target = weight.double() @ covariance[:, kept]  # (rows, kept): what the full width's output correlates with
        refitted = torch.linalg.solve(c_kk, target.T).T.to(weight.dtype)
        if self._cache is not None:
            self._cache[(layer, kind)] = (kept, refitted)
        return refitted


def refuse_adapted(flex) -> None:
    """Compensation reads and refits the LlamaFlex model's own weights: a PEFT-adapted model is refused, both
    when collecting the statistics and when extracting with them."""
    if has_peft_layers(flex):
        raise ValueError("compensation needs the LlamaFlex model itself: merge the adapter first "
                         "(peft_model.merge_and_unload()), then collect the compensation and extract")


@contextmanager
def _own_scores_kept(config) -> Iterator[None]:
    """The model's own `config.architecture_scores` are back in place when the block ends."""
    saved = config.architecture_scores
    try:
        yield
    finally:
        config.architecture_scores = saved


def kept_inputs(config, arch) -> dict[str, torch.Tensor]:
    """The input indices of down_proj ("mlp") and o_proj ("heads") that the sub-model `arch` keeps (the columns
    `slicing` cuts: a prefix of the neurons, a prefix of the query heads within every KV group)."""
    from .slicing import _head_ranges

    heads = torch.cat([torch.arange(a, b) for a, b in _head_ranges(config, arch.heads)])
    return {"mlp": torch.arange(arch.mlp), "heads": heads}


__all__ = ["RIDGE", "Compensation", "kept_inputs"]
