"""Reading safetensors checkpoints by hand, slice by slice: only the bytes a sub-model needs.

safetensors' own `safe_open(...).get_slice` memory-maps the file, and a column slice of a row-major matrix
touches nearly every page of it (mapped pages count as resident memory); `SafetensorsReader` reads row chunks
into one reusable buffer instead, so loading a sub-model needs the sub-model's memory plus that buffer.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from transformers.utils import cached_file

from .slicing import Ranges

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def hub_kwargs(kwargs: dict | None) -> dict:
    """The keywords of `kwargs` that say where and how to fetch files (hub revision, cache, token...)."""
    return {k: v for k, v in (kwargs or {}).items() if k in _HUB_KWARGS}


def safetensors_files(path, kwargs: dict | None = None) -> dict[str, str]:
    """Map every tensor name to the local safetensors file that holds it."""
    hub = hub_kwargs(kwargs)
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        folder = os.path.dirname(index)
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub)
    if single is None:
        raise FileNotFoundError(f"{path} has no model.safetensors(.index.json): loading at a budget needs safetensors weights")
    with safe_open(single, "pt") as fh:
        return {name: single for name in fh.keys()}


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads row and column ranges of named tensors from safetensors files with plain file reads.

    No memory map: a column slice of a row-major matrix touches nearly every page of it, and mapped pages
    count as resident memory. Rows are read in chunks of at most `chunk_bytes` into one reusable buffer and
    only the kept columns are copied out, so memory at load is the sub-model plus that buffer.
    """

    def __init__(self, files: dict[str, str], chunk_bytes: int = 16 * 2**20, source=None):
        self.files = files
        self.source = source if source is not None else (os.path.dirname(next(iter(files.values()))) if files else "?")
        self.chunk_bytes = chunk_bytes
        self._buffer: torch.Tensor | None = None
        self._headers: dict[str, tuple[int, dict]] = {}

    def _entry(self, name: str) -> tuple[str, int, dict]:
        if name not in self.files:
            raise ValueError(
                f"checkpoint {self.source} has no tensor {name}: it is incomplete or was saved for another "
                "config; re-save the checkpoint"
            )
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = self._read_header(file)
        start, header = self._headers[file]
        if name not in header:
            raise ValueError(
                f"checkpoint {self.source}: its index puts tensor {name} in {os.path.basename(file)}, which does not "
                "hold it; re-save the checkpoint"
            )
        return file, start, header[name]

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)[2]["shape"])

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Refuse, before any read, tensors that are missing or whose shape is not the one the config gives."""
        missing = [n for n in expected if n not in self.files]
        if missing:
            raise ValueError(
                f"checkpoint {self.source} is missing tensor(s) its config needs: {_names(missing)}; it is "
                "incomplete or was saved for another config"
            )
        wrong = [(n, self.shape(n), list(shape)) for n, shape in expected.items() if self.shape(n) != list(shape)]
        if wrong:
            shown = "; ".join(f"{n} is {got}, the config needs {want}" for n, got, want in wrong[:4])
            more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
            raise ValueError(
                f"checkpoint {self.source} holds tensor(s) of the wrong shape for its config.json: {shown}{more}; "
                "the weights and the config do not belong together"
            )

    @staticmethod
    def _read_header(file: str) -> tuple[int, dict]:
        """The data offset and header of `file`, refusing a file shorter than its header says (a damaged shard)."""
        with open(file, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            size = int.from_bytes(fh.read(8), "little")
            try:
                if 8 + size > file_size:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(size))
            except ValueError as err:
                raise OSError(
                    f"{file} is not a readable safetensors file ({err}): it is damaged or truncated; re-download or "
                    "re-save the checkpoint"
                ) from None
        data = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
        if 8 + size + data > file_size:
            raise OSError(
                f"{file} is truncated: its header describes {8 + size + data:,} bytes but the file holds "
                f"{file_size:,}; re-download or re-save the checkpoint"
            )
        return 8 + size, header

    def __call__(self, name: str, rows: Ranges, cols: Ranges) -> torch.Tensor:
        file, start, entry = self._entry(name)
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        offset = start + entry["data_offsets"][0]
        row_numel = int(torch.Size(shape[1:]).numel())
        item = torch.empty((), dtype=dtype).element_size()
        rows = rows or [(0, shape[0])]
        cols = cols or ([(0, shape[1])] if len(shape) > 1 else None)
        width = sum(d - c for c, d in cols) if cols else row_numel
        out = torch.empty(sum(b - a for a, b in rows), *([width] if len(shape) > 1 else []), dtype=dtype)
        chunk_rows = max(1, self.chunk_bytes // max(1, row_numel * item))
        need = min(chunk_rows, shape[0]) * row_numel * item
        if self._buffer is None or self._buffer.numel() < need:  # one buffer for every read: no heap churn
            self._buffer = torch.empty(max(need, self.chunk_bytes), dtype=torch.uint8)
        done = 0
        with open(file, "rb", buffering=0) as fh:
            for a, b in rows:
                for r in range(a, b, chunk_rows):
                    n = min(chunk_rows, b - r)
                    raw = self._buffer[: n * row_numel * item]
                    fh.seek(offset + r * row_numel * item)
                    if fh.readinto(memoryview(raw.numpy())) != raw.numel():  # never keep an earlier read's bytes
                        raise OSError(f"{file} ended inside tensor {name}: the file is truncated; re-download or re-save it")
                    block = raw.view(dtype).reshape(n, *shape[1:])
                    if cols is None:
                        out[done : done + n] = block
                    else:
                        col = 0
                        for c, d in cols:
                            out[done : done + n, col : col + d - c] = block[:, c:d]
                            col += d - c
                    done += n
        return out

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: self(n, None, None) for n in self.files if n.startswith(prefix)}


def _names(keys: list[str], prefix: str = "", shown: int = 6) -> str:
    names = ", ".join(prefix + k for k in keys[:shown])
    return names + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


__all__ = ["SafetensorsReader", "hub_kwargs", "safetensors_files"]
