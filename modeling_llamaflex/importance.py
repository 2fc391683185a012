"""Importance of every prunable unit of a Llama, from calibration activations (docs/design.md, "Conversion").

Minitron-style, activation based, no gradients. `collect_statistics` runs the parent over calibration
batches with forward hooks and accumulates, per token:

* MLP neuron j of layer l:   |act(gate(x))·up(x)|_j and its square (the input of down_proj; mean or L2 over tokens),
                             and on request (`covariance=True`) the token sums of a·aᵀ of that input
* query head h of layer l:   ‖attention output of h‖₂      (the input of o_proj, per head)
* hidden channel c:          |RMSNorm output|_c, summed over every norm of every layer
* layer l:                   1 − cos(x_in, x_out)          (block influence)

`collect_taylor_statistics` runs forward *and* backward on the next-token loss and accumulates, per unit, the
first-order estimate of the loss change when the unit is removed, |Σ_tokens a·∂L/∂a| per sequence (Molchanov
et al., 2019), on the same activations (the input of down_proj, each head's slice of the input of o_proj, the
outputs of every RMSNorm). `layer_drop_kl` measures, for each layer, how far the output moves (KL) when that
layer is skipped.

`mlp_reconstruction_scores` orders each layer's neurons by a greedy, nested selection: remove, one at a time, the
neuron whose removal adds least to the squared error of the layer's MLP output on the calibration tokens,
E‖Σ_{removed j} a_j·w_j‖² (w_j: down_proj's column j), computed exactly from the covariance of a and WᵀW. Unlike a
per-neuron score it sees neurons that cancel or duplicate one another, and every prefix of its order is one
greedy step from the next, as nested widths need.

The `*_scores` functions turn those sums into scores (higher = more important), one function per axis.
Which scorer each axis uses is a choice made by measurement (`SCORERS`, `DEFAULT_SCORERS`; the drop-cost
tables are in bench/QUALITY.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DROP_LOSS_TOKENS = 2048  # layer drop losses run on the first calibration batches holding this many tokens


@dataclass
class CalibrationStatistics:
    """Sums over calibration tokens; divide by `tokens` for means."""

    mlp: torch.Tensor  # (layers, intermediate)
    mlp_squares: torch.Tensor  # (layers, intermediate): sums of squares (the L2 aggregation); activation pass only
    heads: torch.Tensor  # (layers, query heads)
    hidden: torch.Tensor  # (hidden,)
    layers: torch.Tensor  # (layers,)
    tokens: int = 0
    mlp_covariance: list[torch.Tensor] | None = None  # per layer (intermediate, intermediate): sums of a·aᵀ, fp32, on
    # the activations' device (L·F² floats: 0.3 GB on SmolLM2, 26 GB on Llama 3.1 8B); only with covariance=True

    @classmethod
    def zeros(cls, config) -> CalibrationStatistics:
        """Empty sums for a Llama config."""
        L = config.num_hidden_layers
        return cls(mlp=torch.zeros(L, config.intermediate_size, dtype=torch.float64),
                   mlp_squares=torch.zeros(L, config.intermediate_size, dtype=torch.float64),
                   heads=torch.zeros(L, config.num_attention_heads, dtype=torch.float64),
                   hidden=torch.zeros(config.hidden_size, dtype=torch.float64),
                   layers=torch.zeros(L, dtype=torch.float64))


def calibration_batches(data, batch_size: int = 8) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(input_ids, attention_mask) batches from a (N, T) tensor, a list of sequences, a `datasets.Dataset`
    with an `input_ids` column, or any iterable of dicts/tensors (a DataLoader)."""
    if isinstance(data, torch.Tensor):
        data = data if data.dim() == 2 else data[None]
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size], None
        return
    if hasattr(data, "column_names"):  # datasets.Dataset
        if "input_ids" not in data.column_names:
            raise ValueError(f"calibration dataset needs an 'input_ids' column, it has {data.column_names}")
        data = data.with_format("torch")
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            yield batch["input_ids"], batch.get("attention_mask")
        return
    items = list(data)
    if items and isinstance(items[0], dict):
        for item in items:
            ids = torch.as_tensor(item["input_ids"])
            mask = item.get("attention_mask")
            yield (ids if ids.dim() == 2 else ids[None]), (None if mask is None else torch.as_tensor(mask).reshape(ids.shape[0] if ids.dim() == 2 else 1, -1))
        return
    sequences = [torch.as_tensor(x) for x in items]
    if not sequences:
        raise ValueError("calibration data is empty")
    if all(s.dim() == 2 for s in sequences):
        for s in sequences:
            yield s, None
        return
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        yield ids, mask


def device_batches(model, data, batch_size: int = 8, progress: bool = True, desc: str = "calibration"):
    """`calibration_batches` on the model's device, with a progress bar; the mask is never None (all ones)."""
    device = next(model.parameters()).device
    for ids, mask in tqdm(list(calibration_batches(data, batch_size)), desc=desc, disable=not progress):
        ids = ids.to(device)
        yield ids, (torch.ones_like(ids) if mask is None else mask.to(device))


def _watch_layer(layer, mlp_hook, head_hook, norm_hook, layer_hook) -> list:
    """Hook a decoder layer where every scorer reads it: the input of down_proj (MLP neurons), the input of
    o_proj (heads), both RMSNorm outputs (hidden channels) and the block itself (layers)."""
    return [
        layer.mlp.down_proj.register_forward_pre_hook(mlp_hook),
        layer.self_attn.o_proj.register_forward_pre_hook(head_hook),
        layer.input_layernorm.register_forward_hook(norm_hook),
        layer.post_attention_layernorm.register_forward_hook(norm_hook),
        layer.register_forward_hook(layer_hook, with_kwargs=True),
    ]


@torch.no_grad()
def collect_statistics(model, data, batch_size: int = 8, progress: bool = True,
                       covariance: bool = False) -> CalibrationStatistics:
    """Run a `LlamaForCausalLM` (or a LlamaFlex model at full size) over `data` and accumulate activations;
    with `covariance`, also each layer's Σ a·aᵀ of the down_proj input (for `mlp_reconstruction_scores`)."""
    config = model.config
    n_q, d = config.num_attention_heads, config.head_dim
    stats = CalibrationStatistics.zeros(config)
    if covariance:
        stats.mlp_covariance = [None] * config.num_hidden_layers
    token_mask: dict[str, torch.Tensor] = {}

    def weighted(x: torch.Tensor) -> torch.Tensor:  # sum over tokens of x (..., B, T, C) -> (C,)
        mask = token_mask["mask"].to(x.dtype)
        return torch.einsum("btc,bt->c", x.float(), mask.float()).double().cpu()

    hooks = []
    for l, layer in enumerate(model.model.layers):

        def mlp_hook(module, args, l=l):
            stats.mlp[l] += weighted(args[0].abs())
            stats.mlp_squares[l] += weighted(args[0].float().pow(2))
            if covariance:
                a = (args[0].float() * token_mask["mask"][..., None].float()).reshape(-1, args[0].shape[-1])
                sums = a.T @ a
                stats.mlp_covariance[l] = sums if stats.mlp_covariance[l] is None else stats.mlp_covariance[l] + sums

        def head_hook(module, args, l=l):
            x = args[0]
            norms = x.reshape(*x.shape[:-1], n_q, d).float().norm(dim=-1)
            stats.heads[l] += weighted(norms)

        def norm_hook(module, args, output):
            stats.hidden.add_(weighted(output.abs()))

        def layer_hook(module, args, kwargs, output, l=l):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            influence = 1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            stats.layers[l] += weighted(influence[..., None])[0]

        hooks += _watch_layer(layer, mlp_hook, head_hook, norm_hook, layer_hook)
    was_training = model.training
    model.eval()
    try:
        for ids, mask in device_batches(model, data, batch_size, progress):
            token_mask["mask"] = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            stats.tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if stats.tokens == 0:
        raise ValueError("calibration data holds no tokens")
    return stats


def _loss(model, ids, mask):
    """Mean next-token loss of a causal LM on a batch (padding masked)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def collect_taylor_statistics(model, data, batch_size: int = 8, progress: bool = True) -> CalibrationStatistics:
    """First-order Taylor importance: per unit, Σ over sequences of |Σ_tokens a·∂L/∂a| (next-token loss).

    `layers` holds the same for whole blocks (the block's residual update times its gradient). The model's
    weights are not changed; their gradients are discarded.
    """
    config = model.config
    n_q, d = config.num_attention_heads, config.head_dim
    stats = CalibrationStatistics.zeros(config)
    batch: dict = {}

    def per_sequence(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, C), padding masked
        return torch.einsum("btc,bt->bc", (x.float() * g.float()), batch["mask"].float()).double().cpu()

    def watch(tensor: torch.Tensor, sink) -> None:
        if tensor.requires_grad:
            value = tensor.detach()

            def hook(grad):  # returns None: the gradient flows on unchanged
                sink(per_sequence(value, grad))

            tensor.register_hook(hook)

    hooks = []
    for l, layer in enumerate(model.model.layers):

        def mlp_hook(module, args, l=l):
            watch(args[0], lambda s, l=l: stats.mlp[l].add_(s.abs().sum(0)))

        def head_hook(module, args, l=l):
            def sink(s, l=l):  # (B, n_q·d) -> per head
                stats.heads[l] += s.reshape(s.shape[0], n_q, d).sum(-1).abs().sum(0)

            watch(args[0], sink)

        def norm_hook(module, args, output):
            watch(output, lambda s: batch["hidden"].append(s))

        def layer_hook(module, args, kwargs, output, l=l):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            delta = (x_out - x_in).detach()
            if x_out.requires_grad:
                def hook(grad, l=l, delta=delta):
                    stats.layers[l] += per_sequence(delta, grad).sum(-1).abs().sum()

                x_out.register_hook(hook)

        hooks += _watch_layer(layer, mlp_hook, head_hook, norm_hook, layer_hook)
    hooks.append(model.model.norm.register_forward_hook(norm_hook))
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    hooks.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        for ids, mask in device_batches(model, data, batch_size, progress, "calibration (taylor)"):
            batch.update(mask=mask, hidden=[])
            _loss(model, ids, mask).backward()
            stats.hidden += torch.stack(batch["hidden"]).sum(0).abs().sum(0)  # one channel: all its norms together
            stats.tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    if stats.tokens == 0:
        raise ValueError("calibration data holds no tokens")
    return stats


class DropKL:
    """KL(model ‖ model with some layers skipped) per token on the first batches of `data` that hold
    `max_tokens` tokens (None: all), the full model's log-probabilities computed once. A skipped layer passes its
    input through; `measure` restores the model before it returns."""

    @torch.no_grad()
    def __init__(self, model, data, batch_size: int = 8, max_tokens: int | None = DROP_LOSS_TOKENS):
        self.model = model
        self.device = next(model.parameters()).device
        self.batches, tokens = [], 0
        for ids, mask in calibration_batches(data, batch_size):
            if max_tokens is not None and tokens >= max_tokens:
                break
            self.batches.append((ids.to(self.device),
                                 torch.ones_like(ids, device=self.device) if mask is None else mask.to(self.device)))
            tokens += int(self.batches[-1][1].sum())
        self.reference = [self._logprobs(ids, mask) for ids, mask in self.batches]

    def _logprobs(self, ids, mask):
        return F.log_softmax(self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)

    @torch.no_grad()
    def measure(self, skipped) -> float:
        was_training = self.model.training
        self.model.eval()
        hooks = [self.model.model.layers[l].register_forward_hook(
            lambda m, a, kw, out: (a[0] if a else kw["hidden_states"]), with_kwargs=True) for l in skipped]
        try:
            total, count = 0.0, 0
            for (ids, mask), ref in zip(self.batches, self.reference):
                kl = (ref.exp() * (ref - self._logprobs(ids, mask))).sum(-1)
                total += float((kl * mask).sum())
                count += int(mask.sum())
            return total / max(count, 1)
        finally:
            for hook in hooks:
                hook.remove()
            self.model.train(was_training)


def layer_drop_kl(model, data, batch_size: int = 8, progress: bool = True,
                  max_tokens: int | None = DROP_LOSS_TOKENS) -> torch.Tensor:
    """(layers,): KL(model ‖ model without layer l) per token, each layer skipped in turn (its input passed
    through), on the first batches of `data` that hold `max_tokens` tokens (None: all): one forward per layer per
    batch. 0 for a layer that changes nothing, whatever the data (a next-token loss can fall by chance)."""
    kl = DropKL(model, data, batch_size, max_tokens)
    layers = range(model.config.num_hidden_layers)
    return torch.tensor([kl.measure([l]) for l in tqdm(layers, desc="layer drop KL", disable=not progress)],
                        dtype=torch.float64)


GREEDY_DROP_CANDIDATES = 8  # layers re-measured at each greedy step (the cheapest of the previous step)


def greedy_layer_drop_scores(model, data, drops: int, batch_size: int = 8, progress: bool = True,
                             max_tokens: int | None = DROP_LOSS_TOKENS,
                             candidates: int | None = GREEDY_DROP_CANDIDATES) -> torch.Tensor:
    """(layers,): the layers in a greedy, nested drop order (higher = dropped later = more important). The first
    `drops` layers go one at a time: each step measures the KL of also dropping each remaining layer, with the
    layers already dropped skipped, and drops the cheapest. Only the `candidates` cheapest of the previous step are
    re-measured (None: every remaining layer; the first step measures all). Dropped layers score their step;
    the rest `drops` plus their rank by the last KL measured. A single-drop ranking (`layer_drop_kl`) misses that
    two layers can be cheap alone and costly together; this costs `drops` × `candidates` passes instead of one
    per layer (bench/QUALITY.md)."""
    layers = model.config.num_hidden_layers
    drops = max(0, min(drops, layers - 1))
    kl = DropKL(model, data, batch_size, max_tokens)
    last = {l: kl.measure([l]) for l in tqdm(range(layers), desc="layer drop KL", disable=not progress)}
    dropped: list[int] = []
    for _ in tqdm(range(drops), desc="greedy layer drop", disable=not progress or not drops):
        remaining = sorted((l for l in last if l not in dropped), key=lambda l: last[l])
        if dropped:  # (the first step takes the single-drop KLs just measured)
            remaining = remaining[: candidates or None]
            for l in remaining:
                last[l] = kl.measure(dropped + [l])
        dropped.append(min(remaining, key=lambda l: last[l]))
    scores = torch.empty(layers, dtype=torch.float64)
    scores[dropped] = torch.arange(len(dropped), dtype=torch.float64)
    rest = sorted((l for l in range(layers) if l not in dropped), key=lambda l: last[l])
    scores[rest] = len(dropped) + torch.arange(len(rest), dtype=torch.float64)
    return scores


# ---- one scoring function per axis: higher means more important ----


def mlp_scores(stats: CalibrationStatistics, aggregation: str = "mean") -> torch.Tensor:
    """(layers, intermediate): per neuron, the mean of |act(gate(x))·up(x)| over tokens, or (`aggregation`
    "l2") its root mean square, which weighs the rare large activations more."""
    if aggregation == "l2":
        return (stats.mlp_squares / stats.tokens).sqrt()
    return stats.mlp / stats.tokens


def greedy_removal_order(gram: torch.Tensor) -> torch.Tensor:
    """Indices in the order a greedy removal takes them, for the quadratic cost e(S) = Σ_{j,k ∈ S} gram[j, k] of
    the removed set S: each step removes the unit that adds least, gram[j, j] + 2·Σ_{k ∈ S} gram[j, k]."""
    gram = gram.double()
    n = gram.shape[0]
    added = torch.diagonal(gram).clone()  # the cost each unit would add now
    removed = torch.zeros(n, dtype=torch.bool, device=gram.device)
    order = torch.empty(n, dtype=torch.long)
    for step in range(n):
        j = int(added.masked_fill(removed, float("inf")).argmin())
        order[step] = j
        removed[j] = True
        added += 2 * gram[:, j]
    return order


@torch.no_grad()
def mlp_reconstruction_scores(stats: CalibrationStatistics, down_weights: list[torch.Tensor],
                              progress: bool = False) -> torch.Tensor:
    """(layers, intermediate): each neuron's step in the greedy removal that keeps the layer's MLP output
    closest to the parent's (higher = removed later = more important). The cost of removing the set S is
    E‖Σ_{j ∈ S} a_j·w_j‖² = Σ_{j,k ∈ S} E[a_j a_k]·(w_j·w_k), from the covariance (`covariance=True`) and
    down_proj's weights (`down_weights[l]`, (hidden, intermediate))."""
    if stats.mlp_covariance is None:
        raise ValueError("the reconstruction scorer needs collect_statistics(..., covariance=True)")
    scores = []
    for covariance, weight in tqdm(list(zip(stats.mlp_covariance, down_weights)), desc="MLP reconstruction order",
                                   disable=not progress):
        w = weight.to(covariance.device, torch.float32)
        gram = (covariance / stats.tokens) * (w.T @ w)
        order = greedy_removal_order(gram)
        score = torch.empty(len(order), dtype=torch.float64)
        score[order] = torch.arange(len(order), dtype=torch.float64)
        scores.append(score)
    return torch.stack(scores)


def head_scores(stats: CalibrationStatistics) -> torch.Tensor:
    """(layers, query heads): mean L2 norm of each head's attention output."""
    return stats.heads / stats.tokens


def hidden_scores(stats: CalibrationStatistics) -> torch.Tensor:
    """(hidden,): mean |RMSNorm output| per channel, summed over all norms of all layers."""
    return stats.hidden / stats.tokens


def layer_scores(stats: CalibrationStatistics) -> torch.Tensor:
    """(layers,): mean block influence 1 − cos(x_in, x_out)."""
    return stats.layers / stats.tokens


SCORERS = {
    "hidden": ("activation", "taylor"),
    "heads": ("activation", "taylor", "activation_weight"),
    "mlp": ("activation", "activation_l2", "taylor", "activation_weight", "reconstruction"),
    "depth": ("block_influence", "taylor", "drop_kl", "greedy_drop_kl"),
}
# Chosen by measurement on SmolLM2-135M (bench/importance.py; the drop-cost tables are in bench/QUALITY.md): the
# activation norm ranks SmolLM2's heads inversely to their harm, the Taylor score in the right order; for MLP
# neurons the greedy reconstruction order costs less than the root mean square of the activation at every width
# (by 0.03 to 0.45 nats, 64 x 256 calibration tokens), which itself beats the mean |a| at 768 to 1344 of 1536;
# for hidden channels the activation score costs less at the sizes the budgets use; the measured change
# of the output when each layer is dropped beats block influence at every depth below 27 of 30.
DEFAULT_SCORERS = {"hidden": "activation", "heads": "taylor", "mlp": "reconstruction", "depth": "drop_kl"}


def resolve_scorers(importance: str | dict | None) -> dict[str, str]:
    """Per-axis scorer names from None (the defaults), one name for every axis that has it, or a dict."""
    scorers = dict(DEFAULT_SCORERS)
    if isinstance(importance, str):
        scorers.update({axis: importance for axis, names in SCORERS.items() if importance in names})
        if not any(importance in names for names in SCORERS.values()):
            raise ValueError(f"importance {importance!r} is not a scorer; allowed per axis: {SCORERS}")
    elif importance is not None:
        unknown = set(importance) - set(SCORERS)
        if unknown:
            raise ValueError(f"importance names unknown axes {sorted(unknown)}; axes are {list(SCORERS)}")
        scorers.update(importance)
    bad = {a: n for a, n in scorers.items() if n not in SCORERS[a]}
    if bad:
        raise ValueError(f"importance scorers {bad} are not allowed; allowed per axis: {SCORERS}")
    return scorers


def score_units(model, data, importance: str | dict | None = None, batch_size: int = 8,
                progress: bool = True, min_depth: int | None = None) -> dict[str, torch.Tensor]:
    """Scores of every unit on every axis (higher = more important) with the chosen scorer per axis.
    `min_depth`: the fewest layers a sub-model keeps (the `greedy_drop_kl` scorer orders the layers down to it;
    default half of them)."""
    scorers = resolve_scorers(importance)
    needed = set(scorers.values())
    stats = {}
    activation_scorers = {"activation", "activation_l2", "block_influence", "activation_weight", "reconstruction"}
    if needed & activation_scorers:
        collected = collect_statistics(model, data, batch_size, progress, covariance=scorers["mlp"] == "reconstruction")
        stats.update(dict.fromkeys(activation_scorers, collected))
    if "taylor" in needed:
        stats["taylor"] = collect_taylor_statistics(model, data, batch_size, progress)
    scores = {
        "hidden": hidden_scores(stats[scorers["hidden"]]),
        "heads": head_scores(stats[scorers["heads"]]),
        "mlp": mlp_scores(stats[scorers["mlp"]], "l2" if scorers["mlp"] == "activation_l2" else "mean"),
    }
    if scorers["mlp"] == "reconstruction":
        downs = [layer.mlp.down_proj.weight for layer in model.model.layers]
        scores["mlp"] = mlp_reconstruction_scores(stats["reconstruction"], downs, progress)
        stats["reconstruction"].mlp_covariance = None  # L·F² floats: free them now
    if scorers["mlp"] == "activation_weight" or scorers["heads"] == "activation_weight":
        out_norms = output_weight_norms(model)
        if scorers["mlp"] == "activation_weight":
            scores["mlp"] = scores["mlp"] * out_norms["mlp"]
        if scorers["heads"] == "activation_weight":
            scores["heads"] = scores["heads"] * out_norms["heads"]
    if scorers["depth"] == "drop_kl":
        scores["depth"] = layer_drop_kl(model, data, batch_size, progress)  # a larger change: more important
    elif scorers["depth"] == "greedy_drop_kl":
        layers = model.config.num_hidden_layers
        drops = layers - (min_depth if min_depth is not None else max(1, layers // 2))
        scores["depth"] = greedy_layer_drop_scores(model, data, drops, batch_size, progress)
    else:
        scores["depth"] = layer_scores(stats[scorers["depth"]])
    return scores


@torch.no_grad()
def output_weight_norms(model) -> dict[str, torch.Tensor]:
    """Per unit, the L2 norm of the weights that write it back to the residual stream (down_proj's column of an
    MLP neuron, o_proj's columns of a head): times the unit's mean activation, the size of what it contributes
    (the `activation_weight` scorer, as Wanda weighs weights by their input's norm)."""
    config = model.config
    n_q, d = config.num_attention_heads, config.head_dim
    mlp, heads = [], []
    for layer in model.model.layers:
        mlp.append(layer.mlp.down_proj.weight.float().norm(dim=0).double().cpu())
        o = layer.self_attn.o_proj.weight.float()
        heads.append(o.reshape(o.shape[0], n_q, d).pow(2).sum((0, 2)).sqrt().double().cpu())
    return {"mlp": torch.stack(mlp), "heads": torch.stack(heads)}


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices from the most to the least important (stable for ties: lower index first)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def head_order(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(layers, query heads): a permutation of each layer's heads that sorts them within their KV group."""
    layers, n_q = scores.shape
    per_group = n_q // num_kv_heads
    within = rank(scores.reshape(layers, num_kv_heads, per_group))
    offsets = torch.arange(num_kv_heads)[None, :, None] * per_group
    return (within + offsets).reshape(layers, n_q)


__all__ = [
    "CalibrationStatistics",
    "calibration_batches",
    "collect_statistics",
    "collect_taylor_statistics",
    "layer_drop_kl",
    "greedy_layer_drop_scores",
    "DropKL",
    "greedy_removal_order",
    "mlp_reconstruction_scores",
    "resolve_scorers",
    "score_units",
    "DEFAULT_SCORERS",
    "SCORERS",
    "head_order",
    "head_scores",
    "hidden_scores",
    "layer_scores",
    "mlp_scores",
    "rank",
]
