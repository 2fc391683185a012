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
from tqdm.auto import tqdm

from .architecture import Architecture, full_architecture, is_full, make_architecture, search_architecture
from .importance import device_batches
from .lora import has_peft_layers

logger = logging.getLogger(__name__)

RIDGE = 1e-4  # λ, relative to the mean of the kept units' variances; measured in bench/QUALITY.md ("Compensation")
MIN_TOKENS_PER_INPUT = 32  # fewer calibration tokens per input column than this: a warning (QUALITY.md)
CONTEXT_RIDGE = 1e-2  # λ of the in-context refit (`Compensation.in_context`), chosen on held-in text (QUALITY.md)


@dataclass
class Compensation:
    """The input covariances of every layer's down_proj (`mlp`, (intermediate, intermediate)) and o_proj
    (`heads`, (heads · head_dim)²), means over `tokens` calibration tokens of the full model."""

    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    tokens: int
    ridge: float = RIDGE
    data: torch.Tensor | list | None = None  # the calibration tokens, kept for `in_context` refits
    context_ridge: float = CONTEXT_RIDGE
    scores: dict | None = None  # the compensated candidates' KL to the parent (`score`), in search's layout
    _cache: dict | None = field(default=None, repr=False)  # while scoring: (layer, kind) -> (kept, refitted weight)

    @classmethod
    @torch.no_grad()
    def from_data(cls, flex, data, batch_size: int = 8, progress: bool = True, ridge: float = RIDGE,
                  in_context: bool = False, context_ridge: float = CONTEXT_RIDGE) -> Compensation:
        """Run the full LlamaFlex model over `data` (token ids: a tensor of blocks, or a list of sequences, as
        for calibration) and keep the covariances. `in_context`: keep `data` too, and refit every extracted
        sub-model on its own inputs (`refit_in_context`) instead of the full model's."""
        if has_peft_layers(flex):
            raise ValueError("compensation needs the LlamaFlex model itself: merge the adapter first "
                             "(peft_model.merge_and_unload()), then collect the compensation")
        if ridge < 0 or context_ridge < 0:
            raise ValueError(f"ridge and context_ridge must be >= 0, got {ridge} and {context_ridge}")
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
        return cls([s / tokens for s in sums["mlp"]], [s / tokens for s in sums["heads"]], tokens, ridge,
                   data if in_context else None, context_ridge)

    def score(self, flex, data, budgets: list[float] | None = None, top_k: int = 8, batch_size: int = 8,
              progress: bool = True) -> dict:
        """Rank the architectures of `budgets` by the measured KL of their *compensated* sub-models, as conversion
        does for the plain slices (`search.score_architectures`), and keep the scores here: `architecture(b)`
        then picks the best compensated sub-model (compensation makes MLP cuts cheaper relative to depth and
        width cuts, so the best architecture can differ). The model's own scores are left as they are."""
        from .search import score_architectures

        saved = flex.config.architecture_scores
        self._cache = {}  # the weights do not change while scoring, and candidates come sorted by their widths
        try:
            self.scores = score_architectures(flex, data, budgets, top_k, batch_size, progress, compensation=self)
        finally:
            flex.config.architecture_scores = saved
            self._cache = None
        return self.scores

    def architecture(self, flex, budget: float | str) -> Architecture:
        """The sub-model `extract(b, compensation=self)` cuts: the best compensated candidate when `score` was
        run, else `flex.architecture(b)`."""
        base = flex.architecture(budget)
        if self.scores is None or base.budget is None or base.budget >= 1:
            return base
        saved, flex.config.architecture_scores = flex.config.architecture_scores, self.scores
        try:
            indices, note = search_architecture(flex.config, base.budget)
        finally:
            flex.config.architecture_scores = saved
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

    @torch.no_grad()
    def refit_in_context(self, flex, sub, arch: Architecture, batch_size: int = 8, progress: bool = True) -> None:
        """Refit, in place, the o_proj and down_proj of `sub` (the plain Llama `extract` cut at `arch`) layer by
        layer on the sub-model's *own* inputs: for every kept layer in order, with the layers before it already
        refitted, W' = (W·C_ps + λ·W_K)·(C_ss + λ·I)⁻¹, C_ss the covariance of the sub-model's kept inputs, C_ps
        their cross-covariance with the parent's full inputs at the same tokens, W the parent's weight, W_K its
        kept columns (λ = context_ridge · mean diag C_ss: the fit shrinks toward the plain slice). So a layer also
        corrects what the cuts before it changed. Projections whose inputs are not cut are left as they are.
        Costs about two forwards of each model over the calibration data, and both models' residual streams for
        all calibration tokens in memory."""
        if self.data is None:
            raise ValueError("refit_in_context needs the calibration data: Compensation.from_data(..., in_context=True)")
        if is_full(flex.config, arch.indices):
            return
        kept, state = kept_inputs(flex.config, arch), flex.state_dict()
        gains = _gains(flex, arch)
        parent = _Layerwise(flex, flex.model.layers, self.data, batch_size, architecture=full_architecture(flex.config))
        child = _Layerwise(sub, sub.model.layers, self.data, batch_size)
        cut = [(kind, module) for kind, module in (("heads", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))
               if len(kept[kind]) < getattr(self, kind)[0].shape[0]]
        kept_layers = list(arch.kept_layers)
        for layer in tqdm(range(kept_layers[-1] + 1), desc="compensation in context", disable=not progress):
            if layer not in kept_layers:
                parent.advance(layer)
                continue
            new = kept_layers.index(layer)
            for kind, name in cut:
                full = state[f"model.layers.{layer}.{name}.weight"][: arch.hidden].double()
                if gains is not None:
                    full = full * gains[0 if kind == "heads" else 1, layer].double()
                target = sub.get_submodule(f"model.layers.{new}.{name}")
                c_ss, c_ps = 0, 0
                for i, mask in enumerate(parent.masks):
                    a_p, a_s = (x.reshape(-1, x.shape[-1]).double() for x in (parent.input(layer, name, i), child.input(new, name, i)))
                    a_s_masked = a_s * mask.reshape(-1, 1)
                    c_ss, c_ps = c_ss + a_s_masked.T @ a_s, c_ps + a_p.T @ a_s_masked
                ridge = self.context_ridge * torch.diagonal(c_ss).mean()
                lhs = c_ss + ridge * torch.eye(len(c_ss), dtype=c_ss.dtype, device=c_ss.device)
                rhs = full @ c_ps + ridge * target.weight.double()
                target.weight.copy_(torch.linalg.solve(lhs, rhs.T).T.to(target.weight.dtype))
            parent.advance(layer)
            child.advance(new)

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


def _gains(flex, arch):
    from .slicing import fold_gains

    return fold_gains(flex.model.modulation, flex.config, arch)


class _Stop(Exception):
    """Raised by a hook to end a forward once it has seen what it needs."""


class _Layerwise:
    """A model's residual stream over calibration batches, advanced one decoder layer at a time: the first
    layer's call is caught once per batch (its arguments: the mask and position embeddings the model builds),
    and every layer is then replayed with the same arguments on the stored hidden states."""

    def __init__(self, model, layers, data, batch_size: int, **forward):
        self.layers, self.calls, self.hidden, self.masks = layers, [], [], []
        for ids, mask in device_batches(model, data, batch_size, progress=False):
            caught = {}

            def catch(module, args, kwargs, caught=caught):
                caught.update(args=args, kwargs=kwargs)
                raise _Stop

            handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False, **forward)
            except _Stop:
                pass
            finally:
                handle.remove()
            self.calls.append((caught["args"][1:], caught["kwargs"]))
            self.hidden.append(caught["args"][0])
            self.masks.append(mask.to(torch.float64))

    def _run(self, layer: int, i: int):
        (args, kwargs), layer_module = self.calls[i], self.layers[layer]
        out = layer_module(self.hidden[i], *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def input(self, layer: int, name: str, i: int) -> torch.Tensor:
        """The input of `name` (a submodule of decoder layer `layer`) in batch `i`, the layer stopped there."""
        seen = []

        def grab(module, args):
            seen.append(args[0])
            raise _Stop

        handle = self.layers[layer].get_submodule(name).register_forward_pre_hook(grab)
        try:
            self._run(layer, i)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0]

    def advance(self, layer: int) -> None:
        self.hidden = [self._run(layer, i) for i in range(len(self.hidden))]


def kept_inputs(config, arch) -> dict[str, torch.Tensor]:
    """The input indices of down_proj ("mlp") and o_proj ("heads") that the sub-model `arch` keeps (the columns
    `slicing` cuts: a prefix of the neurons, a prefix of the query heads within every KV group)."""
    from .slicing import _head_ranges

    heads = torch.cat([torch.arange(a, b) for a, b in _head_ranges(config, arch.heads)])
    return {"mlp": torch.arange(arch.mlp), "heads": heads}


__all__ = ["RIDGE", "Compensation", "kept_inputs"]
