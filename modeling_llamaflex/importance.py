"""Importance of every prunable unit of a Llama, from calibration activations (DESIGN.md §3.1).

Minitron-style, activation based, no gradients. `collect_statistics` runs the parent over calibration
batches with forward hooks and accumulates, per token:

* MLP neuron j of layer l:   |act(gate(x))·up(x)|_j        (the input of down_proj)
* query head h of layer l:   ‖attention output of h‖₂      (the input of o_proj, per head)
* hidden channel c:          |RMSNorm output|_c, summed over every norm of every layer
* layer l:                   1 − cos(x_in, x_out)          (block influence)

The `*_scores` functions turn those sums into scores (higher = more important), one function per axis, so
other rankings (gradient-based, say) can be added beside them with the same signatures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class CalibrationStatistics:
    """Sums over calibration tokens; divide by `tokens` for means."""

    mlp: torch.Tensor  # (layers, intermediate)
    heads: torch.Tensor  # (layers, query heads)
    hidden: torch.Tensor  # (hidden,)
    layers: torch.Tensor  # (layers,)
    tokens: int = 0


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


@torch.no_grad()
def collect_statistics(model, data, batch_size: int = 8, progress: bool = True) -> CalibrationStatistics:
    """Run a `LlamaForCausalLM` (or a LlamaFlex model at full size) over `data` and accumulate activations."""
    config = model.config
    L, n_q, d = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    stats = CalibrationStatistics(
        mlp=torch.zeros(L, config.intermediate_size, dtype=torch.float64),
        heads=torch.zeros(L, n_q, dtype=torch.float64),
        hidden=torch.zeros(config.hidden_size, dtype=torch.float64),
        layers=torch.zeros(L, dtype=torch.float64),
    )
    token_mask: dict[str, torch.Tensor] = {}

    def weighted(x: torch.Tensor) -> torch.Tensor:  # sum over tokens of x (..., B, T, C) -> (C,)
        mask = token_mask["mask"].to(x.dtype)
        return torch.einsum("btc,bt->c", x.float(), mask.float()).double().cpu()

    hooks = []
    for l, layer in enumerate(model.model.layers):

        def mlp_hook(module, args, l=l):
            stats.mlp[l] += weighted(args[0].abs())

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

        hooks += [
            layer.mlp.down_proj.register_forward_pre_hook(mlp_hook),
            layer.self_attn.o_proj.register_forward_pre_hook(head_hook),
            layer.input_layernorm.register_forward_hook(norm_hook),
            layer.post_attention_layernorm.register_forward_hook(norm_hook),
            layer.register_forward_hook(layer_hook, with_kwargs=True),
        ]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids, mask in tqdm(list(calibration_batches(data, batch_size)), desc="calibration", disable=not progress):
            ids = ids.to(device)
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
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


# ---- one scoring function per axis: higher means more important ----


def mlp_scores(stats: CalibrationStatistics) -> torch.Tensor:
    """(layers, intermediate): mean |act(gate(x))·up(x)| per neuron."""
    return stats.mlp / stats.tokens


def head_scores(stats: CalibrationStatistics) -> torch.Tensor:
    """(layers, query heads): mean L2 norm of each head's attention output."""
    return stats.heads / stats.tokens


def hidden_scores(stats: CalibrationStatistics) -> torch.Tensor:
    """(hidden,): mean |RMSNorm output| per channel, summed over all norms of all layers."""
    return stats.hidden / stats.tokens


def layer_scores(stats: CalibrationStatistics) -> torch.Tensor:
    """(layers,): mean block influence 1 − cos(x_in, x_out)."""
    return stats.layers / stats.tokens


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
    "head_order",
    "head_scores",
    "hidden_scores",
    "layer_scores",
    "mlp_scores",
    "rank",
]
