"""Decode speed per architecture on this machine: measured once through the elastic forward, cached on disk.

The table lives in `$LLAMAFLEX_CACHE/latency/<machine-key>.json` (default `~/.cache/llamaflex`): the machine
key names the device (CPU model or GPU name), torch's thread count and torch's version; inside, entries are
keyed by the model's shape and dtype, then by architecture (`"h,q,f,d"` choice indices). An entry is the
median time of one batch-1 decoding step after a 64-token prompt, and the tokens/s it gives: the model's
speed in the server's decoding loop, without HTTP (measured while nothing else runs on the model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import threading
import time

import torch

from modeling_llamaflex.architecture import Architecture, index_key
from modeling_llamaflex.parents import cache_dir

from . import batching

logger = logging.getLogger("serving.latency")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device | str = "cpu") -> str:
    """A readable, file-safe name of this machine as far as speed goes: device, threads, torch version."""
    device = torch.device(device)
    name = f"{device.type}-{_device_name(device)}-{torch.get_num_threads()}t-torch{torch.__version__}"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()[:80]
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def model_key(model, protocol: str = "") -> str:
    """The shape and dtype of the elastic model (and how speeds were measured): equal shapes run at equal speed."""
    c = model.config
    fields = (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
              c.intermediate_size, c.num_hidden_layers, c.tie_word_embeddings, tuple(c.hidden_choices),
              tuple(c.head_choices), tuple(c.mlp_choices), tuple(c.depth_choices), str(model.dtype), protocol)
    return hashlib.sha1(repr(fields).encode()).hexdigest()[:16]


@torch.inference_mode()
def measure_decode(model, arch: Architecture, steps: int = 16, prompt_tokens: int = 64) -> dict:
    """Median batch-1 decoding step of `arch` on the elastic model, sampling included (after a prompt and one
    warm-up step): what the server's scheduler runs per token, without the HTTP around it."""
    prompt = [[3 + i % (model.config.vocab_size - 3) for i in range(prompt_tokens)]]
    logits, cache, mask = batching.prefill(model, arch, prompt, pad_id=0)
    token = logits.argmax(-1)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits, mask = batching.decode(model, arch, token, cache, mask)
        token = logits.argmax(-1)
        if logits.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return {"decode_tokens_per_s": 1.0 / step, "step_ms": step * 1e3, "steps": steps, "prompt_tokens": prompt_tokens,
            "measured_at": time.time()}


class LatencyTable:
    """Decode tokens/s per architecture of one model on this machine, measured on first use and kept on disk."""

    def __init__(self, model, path: str | None = None, steps: int = 16, prompt_tokens: int = 64):
        self.model, self.steps, self.prompt_tokens = model, steps, prompt_tokens
        device = model.get_input_embeddings().weight.device
        self.path = path or os.path.join(cache_dir(), "latency", f"{machine_key(device)}.json")
        self.key = model_key(model, f"batch1-prompt{prompt_tokens}-steps{steps}")
        self._lock = threading.Lock()
        self._entries = self._read().get(self.key, {})

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning("ignoring the unreadable latency table %s (%s): measuring again", self.path, err)
            return {}

    def _write(self) -> None:
        data = self._read()
        data[self.key] = self._entries
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)  # never a half-written table

    def measured(self, arch: Architecture) -> bool:
        return index_key(arch.indices) in self._entries

    def tokens_per_second(self, arch: Architecture) -> float:
        """Decode tokens/s of `arch` (batch 1), measured now if this machine has not measured it yet."""
        key = index_key(arch.indices)
        with self._lock:
            if key not in self._entries:
                self._entries[key] = measure_decode(self.model, arch, self.steps, self.prompt_tokens)
                logger.info("latency of %s: %.1f tokens/s (%s)", key, self._entries[key]["decode_tokens_per_s"],
                            self.path)
                self._write()
            return self._entries[key]["decode_tokens_per_s"]

    def measure_all(self, archs: list[Architecture]) -> None:
        """Fill the table for `archs` (what `serve --measure_latency` does before taking requests)."""
        todo = [a for a in archs if not self.measured(a)]
        logger.info("measuring decode speed of %d architectures (%d cached) into %s", len(todo),
                    len(archs) - len(todo), self.path)
        for arch in todo:
            self.tokens_per_second(arch)


__all__ = ["LatencyTable", "machine_key", "measure_decode", "model_key"]
