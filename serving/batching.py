"""Batched decoding of one architecture on the one elastic model: left-padded rows sharing one KV cache.

Every function here runs the shared `LlamaFlexForCausalLM` at an `Architecture` (sliced, no copy of any weight).
A batch is a `DynamicCache` of shape (rows, kv_heads, tokens, head_dim) per kept layer plus an attention mask
(rows, tokens): rows are left-padded, so every row's next token goes in the same column. Rows join a running
batch by `merge` (the shorter side is padded on the left) and leave it by `select`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from modeling_llamaflex.architecture import Architecture


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (rows, longest) padded on the left with `pad_id`, and the mask of real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long, device=device)
            mask[row, width - len(seq):] = 1
    return ids, mask


def _logits(model, arch: Architecture, ids, mask, positions, cache) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1, architecture=arch)  # no router runs: the architecture was chosen once
    return out.logits[:, -1, :].float()


def prefill(model, arch: Architecture, sequences: list[list[int]], pad_id: int):
    """Run the prompts of new rows: (next-token logits (rows, vocab), their cache, their mask)."""
    ids, mask = left_pad(sequences, pad_id, model.get_input_embeddings().weight.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    return _logits(model, arch, ids, mask, positions, cache), cache, mask


def decode(model, arch: Architecture, tokens: torch.Tensor, cache: DynamicCache, mask: torch.Tensor):
    """One step for every row: `tokens` (rows,) go in; (next-token logits, the mask with their column)."""
    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    positions = mask.sum(-1, keepdim=True) - 1
    return _logits(model, arch, tokens[:, None], mask, positions, cache), mask


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers if layer.is_initialized]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - tensor.shape[dim]
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor):
    """Rows of two batches of one architecture as one batch (a's rows first): (cache, mask)."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    layers = []
    for (ka, va), (kb, vb) in zip(_layers(cache_a), _layers(cache_b), strict=True):
        layers.append((torch.cat([_pad_left(ka, width, 2), _pad_left(kb, width, 2)]),
                       torch.cat([_pad_left(va, width, 2), _pad_left(vb, width, 2)])))
    mask = torch.cat([_pad_left(mask_a, width, 1), _pad_left(mask_b, width, 1)])
    return DynamicCache(ddp_cache_data=layers), mask


def select(cache: DynamicCache, mask: torch.Tensor, rows: list[int]):
    """Keep only `rows` (in that order), and drop the columns that are padding in all of them: (cache, mask)."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask[index]
    real = mask.any(0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    layers = [(k[index, :, start:], v[index, :, start:]) for k, v in _layers(cache)]
    return DynamicCache(ddp_cache_data=layers), mask[:, start:]


__all__ = ["decode", "left_pad", "merge", "prefill", "select"]
