"""Packed blocks of token ids for causal-LM training, from any ``datasets`` text source.

The pipeline is the one of transformers' ``run_clm.py``, in three steps:

1. :func:`load_text_datasets` loads the raw text with ``train`` and ``validation`` splits: local
   text, JSON Lines, CSV or Parquet files, or a dataset on the Hugging Face hub (where it can be
   reached). A source without a validation split gets one carved out of its training rows, so the
   two splits never share a document.
2. :func:`pack_dataset` tokenizes every row (``Dataset.map(batched=True)``), wraps each document in
   the tokenizer's ``bos``/``eos`` tokens, concatenates the rows and cuts the stream into blocks of
   ``block_size`` tokens. Without streaming a whole split is packed as one stream, so only its final
   remainder (fewer than ``block_size`` tokens) is dropped; with ``streaming=True`` the same runs
   lazily on an ``IterableDataset``, ``pack_rows`` rows at a time, and each such batch drops its own
   remainder.
3. :func:`build_lm_datasets` does both for a :class:`DataArguments` (an ``HfArgumentParser``
   dataclass).

The packed datasets have a single column, ``input_ids``, of length ``block_size``. Labels are left to
the collator: :func:`lm_data_collator` (``DataCollatorForLanguageModeling(mlm=False)``) copies
``input_ids`` to ``labels`` in each batch, and the model shifts them by one position itself.

Rows are documents (a JSON row, a Parquet row, a whole text file with ``sample_by="document"``, a
paragraph with ``"paragraph"``), except text files read with ``sample_by="line"``: then the lines,
line breaks kept, are joined as they are, without ``bos``/``eos`` between them.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from datasets import (Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset)
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUILDERS_BY_EXTENSION: dict[str, str] = {
    ".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
}
"""Local file types and the ``datasets`` builder that reads each."""
SAMPLE_BY = ("document", "paragraph", "line")

AnyDataset = Dataset | IterableDataset
AnyDatasetDict = DatasetDict | IterableDatasetDict


@dataclass
class DataArguments:
    """Where the training text comes from and how it is cut into blocks."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hugging Face hub (needs the hub to be reachable)."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration of `dataset_name`, if it has several."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training text: a path or glob of .txt/.text, .json/.jsonl, .csv or .parquet files."})
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Local validation text, of the same type as `train_file`. Without it, "
                          "`validation_split_percentage` of the training rows are held out."})
    text_column: str = field(default="text", metadata={"help": "The column that holds the text."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training block (the sequence length)."})
    sample_by: str = field(
        default="document",
        metadata={"help": "How text files are split into rows: 'document' (a file is one document), "
                          "'paragraph' (blank-line separated documents) or 'line' (lines joined as they are)."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the source lazily (IterableDataset) instead of preparing it on disk; for "
                          "sources too large to prepare. Training then needs `max_steps`."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of training rows held out when there is no validation split."})
    streaming_validation_rows: int = field(
        default=1000,
        metadata={"help": "With streaming and no validation split: the first N rows are held out as validation."})
    pack_rows: int | None = field(
        default=None,
        metadata={"help": "Rows joined per packing batch; each batch drops its remainder. Default: the whole "
                          "split without streaming (only the final remainder is lost), 1000 with streaming."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (not used with streaming)."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where `datasets` caches downloads and processed splits."})
    validation_split_seed: int = field(
        default=42, metadata={"help": "Seed of the train/validation split when one is carved out."})

    def __post_init__(self) -> None:
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"sample_by={self.sample_by!r} is not one of {SAMPLE_BY}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 tokens, got {self.block_size}")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError("validation_split_percentage must lie in (0, 100), "
                             f"got {self.validation_split_percentage}")


def _resolve_files(name: str, pattern: str) -> tuple[str, list[str]]:
    """Check that a local path or glob names existing files of one known type; return (builder, files)."""
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(
            f"{name}={pattern!r}: no such file{' (the glob matched nothing)' if not files else ''}. Give an "
            f"existing path or glob of {sorted(BUILDERS_BY_EXTENSION)} files, or `dataset_name` for a hub dataset.")
    builders = {BUILDERS_BY_EXTENSION.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})
        raise ValueError(f"{name}={pattern!r} has file types {suffixes}; one type of "
                         f"{sorted(BUILDERS_BY_EXTENSION)} is allowed.")
    return builders.pop(), files  # type: ignore[return-value]


def _column_names(dataset: AnyDataset) -> list[str]:
    """Column names; a streamed source of unknown features is asked for its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if first is not None else []


def load_text_datasets(args: DataArguments) -> AnyDatasetDict:
    """Load the raw text of ``args`` as a dict with ``train`` and ``validation`` splits.

    Raises:
        FileNotFoundError: a local file or glob that names no file.
        ValueError: no source given, an unknown file type, or a missing ``text_column``.
    """
    if args.train_file is not None:
        builder, train_files = _resolve_files("train_file", args.train_file)
        data_files = {"train": train_files}
        kwargs: dict = {}
        if args.validation_file is not None:
            val_builder, data_files["validation"] = _resolve_files("validation_file", args.validation_file)
            if val_builder != builder:
                raise ValueError(f"train_file is read as {builder!r} but validation_file as {val_builder!r}; "
                                 "give files of the same type.")
        if builder == "text":
            kwargs = {"sample_by": args.sample_by, "keep_linebreaks": True}
        raw = load_dataset(builder, data_files=data_files, streaming=args.streaming, cache_dir=args.cache_dir,
                           **kwargs)
        source = args.train_file
    elif args.dataset_name is not None:
        raw = load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming,
                           cache_dir=args.cache_dir)
        source = args.dataset_name
        if "train" not in raw:
            raise ValueError(f"dataset {source!r} has no 'train' split; it has {list(raw)}")
    else:
        raise ValueError("No training text: give `train_file` (local files) or `dataset_name` (hub).")

    if "validation" not in raw:
        train = raw["train"]
        if args.streaming:
            n = args.streaming_validation_rows
            raw = IterableDatasetDict({"train": train.skip(n), "validation": train.take(n)})
        else:
            split = train.train_test_split(test_size=args.validation_split_percentage / 100,
                                           seed=args.validation_split_seed)
            raw = DatasetDict({"train": split["train"], "validation": split["test"]})
        logger.info("No validation split in %s: held out %s of the training rows", source,
                    f"the first {args.streaming_validation_rows}" if args.streaming
                    else f"{args.validation_split_percentage}%")
    else:
        raw = type(raw)({"train": raw["train"], "validation": raw["validation"]})

    for split, dataset in raw.items():
        columns = _column_names(dataset)
        if args.text_column not in columns:
            raise ValueError(f"text_column={args.text_column!r} is not a column of the {split} split of {source!r}; "
                             f"its columns are {columns}. Pass one of them as `text_column`.")
    return raw


def _group_blocks(batch: pa.Table, block_size: int) -> pa.Table:
    """Concatenate the token lists of a batch of rows and cut them into blocks (remainder dropped)."""
    tokens = pc.list_flatten(batch["input_ids"]).combine_chunks()
    usable = len(tokens) // block_size * block_size
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(tokens.slice(0, usable), block_size)})


def pack_dataset(
    dataset: AnyDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    add_document_tokens: bool = True,
    pack_rows: int | None = None,
    num_proc: int | None = None,
    split_name: str = "",
) -> AnyDataset:
    """Tokenize ``dataset[text_column]`` and pack the tokens into blocks of ``block_size``.

    Args:
        dataset: Raw text rows (``Dataset`` or, streamed, ``IterableDataset``).
        tokenizer: Any Hugging Face tokenizer. Special tokens are not added by the tokenizer call;
            with ``add_document_tokens`` each row becomes ``[bos] + tokens + [eos]`` (either left
            out if the tokenizer has none).
        block_size: Tokens per block.
        text_column: The column that holds the text.
        add_document_tokens: Treat rows as documents and mark their boundaries; turn off when rows
            are pieces of one text (lines).
        pack_rows: Rows joined per packing batch; each batch drops its remainder of fewer than
            ``block_size`` tokens. ``None``: the whole split at once (only the final remainder is
            lost); with an ``IterableDataset``, 1000.
        num_proc: Processes for tokenization (``Dataset`` only).
        split_name: Used in progress-bar labels.

    Returns:
        A dataset of the same kind whose only column is ``input_ids`` (lists of ``block_size`` ids).
    """
    streaming = isinstance(dataset, IterableDataset)
    bos, eos = (tokenizer.bos_token_id, tokenizer.eos_token_id) if add_document_tokens else (None, None)
    prefix, suffix = [t for t in (bos,) if t is not None], [t for t in (eos,) if t is not None]

    def tokenize(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        texts = [text or "" for text in batch[text_column]]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [prefix + row + suffix if row else [] for row in ids]}

    columns = _column_names(dataset)
    map_kwargs = {} if streaming else {"num_proc": num_proc, "desc": f"Tokenizing {split_name}".strip()}
    tokenized = dataset.map(tokenize, batched=True, remove_columns=columns, **map_kwargs)

    if pack_rows is None and streaming:
        pack_rows = 1000
    map_kwargs = {} if streaming else {"desc": f"Packing {split_name} into blocks of {block_size}".strip()}
    packed = tokenized.with_format("arrow").map(
        _group_blocks, batched=True, batch_size=pack_rows, fn_kwargs={"block_size": block_size}, **map_kwargs)
    return packed.with_format(None)


def build_lm_datasets(args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> AnyDatasetDict:
    """Load the source of ``args`` and pack its ``train`` and ``validation`` splits into blocks."""
    raw = load_text_datasets(args)
    is_text_lines = (args.train_file is not None and args.sample_by == "line"
                     and BUILDERS_BY_EXTENSION.get(Path(args.train_file).suffix.lower()) == "text")
    packed = {
        split: pack_dataset(dataset, tokenizer, args.block_size, args.text_column,
                            add_document_tokens=not is_text_lines, pack_rows=args.pack_rows,
                            num_proc=args.preprocessing_num_workers, split_name=split)
        for split, dataset in raw.items()
    }
    if not args.streaming:
        for split, dataset in packed.items():
            logger.info("%s: %d blocks of %d tokens", split, len(dataset), args.block_size)
            if len(dataset) == 0:
                raise ValueError(f"The {split} split has fewer than block_size={args.block_size} tokens; "
                                 "give more text or a smaller block_size.")
    return IterableDatasetDict(packed) if args.streaming else DatasetDict(packed)


def lm_data_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForLanguageModeling:
    """The collator for packed blocks: stacks them and sets ``labels = input_ids`` (causal LM, no masking)."""
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)
