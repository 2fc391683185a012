"""Budgets that name a device's limits: `mem:300MB` (memory) and `tps:50` (decode tokens/s on this machine).

    resolve_device_budget(model, "mem:300MB")                 # weights + KV cache for the context, batch 1
    resolve_device_budget(model, "mem:2GB,context=4096,batch=8")
    resolve_device_budget(model, "tps:50")                    # batch-1 decode speed, from the latency table

Both return the `Architecture` of best quality that meets the limit, its `note` saying what it needs and why
it won. Quality is the loss conversion measured for that combination (`architecture.measured_loss`), else the
loss predicted from single-axis cuts (`predicted_loss`), else (a model converted without scores) its size.
Memory is the sub-model's own footprint, as if extracted: its weights (non-embedding parameters from
`count_parameters`, plus the embedding and LM head at its width) and its KV cache, in the serving dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from modeling_llamaflex.architecture import (
    Architecture,
    exportable_grid,
    is_full,
    make_architecture,
    measured_loss,
    predicted_loss,
)

_SPEC = re.compile(r"^\s*(mem|tps)\s*:\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*((?:,\s*[a-z_]+\s*=\s*[0-9]+\s*)*)$", re.I)
_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
SYNTAX = ("'mem:<size>[,context=<tokens>][,batch=<rows>]' (size in B, KB, MB, GB, KiB, MiB, GiB), or "
          "'tps:<decode tokens/s>'")


@dataclass(frozen=True)
class DeviceBudget:
    kind: str  # "mem" (limit in bytes) or "tps" (limit in decode tokens/s)
    limit: float
    context: int | None = None
    batch: int | None = None
    text: str = ""


def is_device_budget(spec) -> bool:
    return isinstance(spec, str) and spec.strip().lower().startswith(("mem:", "tps:"))


def parse_device_budget(spec: str) -> DeviceBudget:
    """`mem:300MB[,context=N][,batch=B]` or `tps:50`, or a ValueError saying what the syntax is."""
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"budget {spec!r} is not a device budget: write {SYNTAX}")
    kind, number, unit, options = match.group(1).lower(), float(match.group(2)), match.group(3).lower(), match.group(4)
    opts = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        name, value = (s.strip().lower() for s in part.split("="))
        if name not in ("context", "batch") or (kind == "tps" and name == "context"):
            allowed = "context and batch" if kind == "mem" else "none (tps: is batch-1 decode speed)"
            raise ValueError(f"budget {spec!r}: unknown option {name!r}; {kind}: takes {allowed}")
        opts[name] = int(value)
    if kind == "tps" and opts.get("batch", 1) != 1:
        raise ValueError(f"budget {spec!r}: tps: is measured at batch 1 only; drop the batch option")
    if kind == "mem" and unit not in _BYTES:
        raise ValueError(f"budget {spec!r}: unknown memory unit {unit!r}; use one of B, KB, MB, GB, KiB, MiB, GiB")
    if kind == "tps" and unit not in ("", "tok/s", "tps"):
        raise ValueError(f"budget {spec!r}: tps: takes a number of tokens per second, such as 'tps:50'")
    if number <= 0 or any(v < 1 for v in opts.values()):
        raise ValueError(f"budget {spec!r}: the limit, context and batch must be positive")
    limit = number * _BYTES[unit] if kind == "mem" else number
    return DeviceBudget(kind, limit, opts.get("context"), opts.get("batch"), spec.strip())


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def memory_bytes(config, arch: Architecture, context: int, batch: int = 1, dtype=torch.float32) -> dict[str, int]:
    """Bytes the sub-model needs on its own: weights (non-embedding parameters plus the embedding and, if untied,
    the LM head at its width) and the KV cache of `batch` rows of `context` tokens."""
    size = torch.empty((), dtype=dtype).element_size()
    embedding = config.vocab_size * arch.hidden * (1 if config.tie_word_embeddings else 2)
    weights = (arch.num_parameters + embedding) * size
    kv = 2 * arch.depth * config.num_key_value_heads * config.head_dim * context * batch * size
    return {"weights": int(weights), "kv_cache": int(kv), "total": int(weights + kv)}


def ranked_architectures(config) -> list[tuple[Architecture, float | None, str]]:
    """Every exportable architecture, best quality first: (architecture, loss or None, where the loss is from)."""
    scores = config.architecture_scores or {}
    out = []
    for indices, _ in exportable_grid(config):
        arch = make_architecture(config, indices)
        if is_full(config, indices) and scores.get("parent") is not None:
            loss, source = scores["parent"], "the parent's"
        elif (loss := measured_loss(config, indices)) is not None:
            source = "measured"
        elif (loss := predicted_loss(config, indices)) is not None:
            source = "predicted"
        else:
            loss, source = None, "no quality scores: the largest"
        out.append((arch, loss, source))
    out.sort(key=lambda a: (math.inf if a[1] is None else a[1], -a[0].num_parameters, -a[0].depth))
    return out


def _finish(config, arch: Architecture, spec: str, note: str) -> Architecture:
    parent = config.parent_parameters()
    return make_architecture(config, arch.indices, budget=arch.num_parameters / parent,
                             target_parameters=arch.num_parameters, note=f"{spec}: {note}")


def _quality(loss: float | None, source: str) -> str:
    return source if loss is None else f"{source} loss {loss:.3f}"


def resolve_memory(model, budget: DeviceBudget, context: int | None = None, batch: int | None = None,
                   dtype=None) -> Architecture:
    config = model.config
    context = budget.context or context or config.max_position_embeddings
    batch = budget.batch or batch or 1
    dtype = dtype or model.dtype
    ranked = ranked_architectures(config)
    needs = [(arch, loss, source, memory_bytes(config, arch, context, batch, dtype)) for arch, loss, source in ranked]
    fits = [n for n in needs if n[3]["total"] <= budget.limit]
    where = f"context {context} x batch {batch}, {str(dtype).removeprefix('torch.')}"
    if not fits:
        small = min(needs, key=lambda n: n[3]["total"])[3]
        raise ValueError(
            f"no architecture fits {budget.text}: the smallest needs {_megabytes(small['total'])} (weights "
            f"{_megabytes(small['weights'])} + KV cache {_megabytes(small['kv_cache'])} for {where}); allow at least "
            f"that, or a shorter context or smaller batch (e.g. 'mem:{budget.limit / 1e6:g}MB,context=256')")
    arch, loss, source, need = fits[0]
    return _finish(config, arch, budget.text,
                   f"needs {_megabytes(need['total'])} (weights {_megabytes(need['weights'])} + KV cache "
                   f"{_megabytes(need['kv_cache'])} for {where}); best quality ({_quality(loss, source)}) of the "
                   f"{len(fits)} of {len(needs)} architectures that fit")


def _dominates(a: Architecture, b: Architecture) -> bool:
    """a is at least as large as b on every axis (so it is no faster)."""
    return all(a.indices[k] >= b.indices[k] for k in a.indices)


def resolve_speed(model, budget: DeviceBudget, latency) -> Architecture:
    """Walk the architectures best quality first, measuring (once per machine) until one decodes fast enough.
    An architecture at least as large on every axis as one already too slow is skipped unmeasured."""
    too_slow: list[tuple[Architecture, float]] = []
    for arch, loss, source in ranked_architectures(model.config):
        if any(_dominates(arch, slow) for slow, _ in too_slow):
            continue
        speed = latency.tokens_per_second(arch)
        if speed >= budget.limit:
            return _finish(model.config, arch, budget.text,
                           f"decodes {speed:,.1f} tokens/s at batch 1 on this machine ({latency.path}); best quality "
                           f"({_quality(loss, source)}) that reaches {budget.limit:g} tokens/s")
        too_slow.append((arch, speed))
    fastest = max(s for _, s in too_slow)
    raise ValueError(f"no architecture reaches {budget.text} on this machine: the fastest decodes {fastest:,.1f} "
                     f"tokens/s at batch 1 (measured, {latency.path}); ask for at most that")


def resolve_device_budget(model, spec: str, *, context: int | None = None, batch: int | None = None, dtype=None,
                          latency=None) -> Architecture:
    """The best-quality architecture of the elastic `model` that meets `spec` ('mem:...' or 'tps:...').

    `context`/`batch` are the defaults for a `mem:` spec that does not give its own (context: the model's
    `max_position_embeddings`; batch 1); `dtype` the serving dtype (default: the model's); `latency` a
    `LatencyTable` for `tps:` (default: this machine's table for this model, measured on first use).
    """
    budget = parse_device_budget(spec)
    if budget.kind == "mem":
        return resolve_memory(model, budget, context, batch, dtype)
    if latency is None:
        from .latency import LatencyTable

        latency = LatencyTable(model)
    return resolve_speed(model, budget, latency)


__all__ = ["DeviceBudget", "is_device_budget", "memory_bytes", "parse_device_budget", "ranked_architectures",
           "resolve_device_budget"]
