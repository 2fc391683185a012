"""Standard multiple-choice benchmarks offline, built from BIG-bench's PyPI source archive (issue 10).

PyPI's ``bigbench==1.0.0`` source archive (358 MB; ``pip download --no-deps bigbench==1.0.0``, never
installed) holds every BIG-bench JSON task as ``bigbench/benchmark_tasks/<task>[/<subtask>]/task.json``:
``{"examples": [{"input": ..., "target_scores": {choice: 0|1, ...}}], "task_prefix": ..., ...}``. This module
reads the selected ``task.json`` files straight from the ``.tar.gz`` (one pass with `tarfile`, nothing
extracted) or from an unpacked folder, and writes each task as JSONL + lm-eval YAML (``output_type:
multiple_choice``, ``dataset_path: json``, absolute ``data_files``), tag ``llamaflex_bigbench``, named
``bb_<task>`` (``bb_social_iqa``).

Prompts follow BIG-bench's own JSON-task formatting (``bigbench/api/json_task.py``): ``task_prefix`` once
(lm-eval's ``description``), then ``example_input_prefix`` (default ``"\\nQ: "``) + input, the choices after
``choice_prefix`` (default ``"\\n  choice: "``) when ``append_choices_to_input`` (default true), and
``example_output_prefix`` (default ``"\\nA: "``); the choices are scored as continuations (acc, acc_norm).
Items without exactly one best-scoring choice are skipped. Items and the order of their choices are
shuffled with the seed; at most ``max_examples`` are kept per task.

One task is not a BIG-bench JSON task: ``bb_winogrande`` takes the WinoGrande twin sentences that
``natural_instructions/subtask029_winogrande_full_object`` carries as targets ("Sentence 1: ... _ ...
Answer1: x. Sentence 2: ... Answer2: y.") and scores them like lm-eval's ``winogrande`` (partial scoring: the
option is put into the blank, the rest of the sentence is the continuation; ``acc`` only).

Which tasks are built by default (`DEFAULT_TASKS`) is measured: those on which SmolLM2-135M-Instruct is
clearly above chance (eval/README.md has the numbers). Any other BIG-bench JSON multiple-choice task can be
built by its path, e.g. ``--bigbench_tasks sports_understanding,logical_deduction/three_objects``.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TAG = "llamaflex_bigbench"
PACKAGE = "bigbench==1.0.0"
ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bigbench"
TASKS_ROOT = "bigbench/benchmark_tasks/"  # inside the archive, below its top folder "bigbench-1.0.0/"
MANIFEST = "bigbench_manifest.json"
# BIG-bench's defaults (bigbench/api/json_task.py)
INPUT_PREFIX, OUTPUT_PREFIX, CHOICE_PREFIX = "\nQ: ", "\nA: ", "\n  choice: "


@dataclass(frozen=True)
class Source:
    """Where a task comes from in benchmark_tasks/, how to read it, and its main metric in the results table."""

    path: str
    kind: str = "json"  # "json": target_scores items; "winogrande": NI twin-sentence targets
    metric: str = "acc_norm"  # acc_norm for free-text choices (length-normalised), acc for label choices


CANDIDATES: dict[str, Source] = {
    "bb_social_iqa": Source("social_iqa"),
    "bb_physical_intuition": Source("physical_intuition"),
    "bb_winowhy": Source("winowhy", metric="acc"),
    "bb_hyperbaton": Source("hyperbaton", metric="acc"),
    "bb_strategyqa": Source("strategyqa", metric="acc"),
    "bb_causal_judgment": Source("causal_judgment", metric="acc"),
    "bb_goal_inference": Source("goal_step_wikihow/goal_inference"),
    "bb_step_inference": Source("goal_step_wikihow/step_inference"),
    "bb_timedial": Source("timedial"),
    "bb_winogrande": Source("natural_instructions/subtask029_winogrande_full_object", kind="winogrande",
                            metric="acc"),
}
# Kept by default: SmolLM2-135M-Instruct clearly above chance (eval/README.md, "BIG-bench tasks": winogrande
# 68.0 +- 4.7 acc, chance 50; social_iqa 44.5 +- 2.5 acc_norm, chance 33.3). Measured at chance and left out:
# strategyqa, goal_inference; the other candidates were not measured yet (`--bigbench_tasks all` builds them).
DEFAULT_TASKS: tuple[str, ...] = ("bb_social_iqa", "bb_winogrande")


def source_for(name: str) -> tuple[str, Source]:
    """A task name (``bb_social_iqa``) or a BIG-bench path (``social_iqa``, ``logical_deduction/three_objects``)
    -> (task name, source)."""
    if name in CANDIDATES:
        return name, CANDIDATES[name]
    path = name.strip().strip("/")
    for known, source in CANDIDATES.items():
        if source.path == path:
            return known, source
    if name.startswith("bb_") or not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*", path):
        raise ValueError(f"unknown BIG-bench task {name!r}: give one of {', '.join(CANDIDATES)}, or the path of a "
                         "JSON task under bigbench/benchmark_tasks/ (e.g. sports_understanding)")
    return "bb_" + path.replace("/", "_"), Source(path)


class BigBenchUnavailable(RuntimeError):
    """No reachable package index has ``bigbench==1.0.0`` (seen 2026-12-07: PyPI lists only 0.0.1)."""


def fetch_bigbench(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The ``bigbench==1.0.0`` source archive in `cache_dir`, downloaded with ``pip download`` (no install)
    unless it is already there; `BigBenchUnavailable` if no index has it."""
    archive = cache_dir / ARCHIVE_NAME
    if archive.is_file():
        return archive
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(cache_dir), PACKAGE]
    print(f"downloading {PACKAGE} (a 358 MB source archive, not installed): {' '.join(cmd)}", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        raise BigBenchUnavailable(
            f"`pip download --no-deps {PACKAGE}` failed (exit {result.returncode}): no package index with "
            f"{PACKAGE} was reachable. Download {ARCHIVE_NAME} elsewhere (`pip download --no-deps -d DIR "
            f"{PACKAGE}`) and put it into {cache_dir}, or pass its path to --bigbench.\n"
            f"{result.stdout[-1500:]}{result.stderr[-1500:]}"
        )
    return archive


def _wanted(rel: str, paths: Iterable[str]) -> str | None:
    """The source path that the task.json at `rel` (relative to benchmark_tasks/) belongs to, if any."""
    if not rel.endswith("task.json"):
        return None
    folder = rel[: -len("task.json")].rstrip("/")
    return next((p for p in paths if folder == p or folder.startswith(p + "/")), None)


def read_task_files(location: Path, paths: Sequence[str]) -> dict[str, dict[str, dict]]:
    """source path -> {task.json folder relative to benchmark_tasks/: parsed JSON}, for every task.json at or
    below each of `paths`, read from the archive (one sequential pass, nothing extracted) or a folder."""
    found: dict[str, dict[str, dict]] = {p: {} for p in paths}
    if location.is_dir():
        roots = [location / "bigbench" / "benchmark_tasks", location / "benchmark_tasks",
                 *sorted(location.glob("bigbench-*/bigbench/benchmark_tasks"))]
        root = next((r for r in roots if r.is_dir()), location)  # else: `location` is benchmark_tasks itself
        for p in paths:
            for file in sorted((root / p).glob("**/task.json")) if (root / p).is_dir() else []:
                rel = file.relative_to(root).as_posix()
                found[p][rel[: -len("/task.json")]] = json.loads(file.read_text(encoding="utf-8"))
    elif location.is_file() and tarfile.is_tarfile(location):
        with tarfile.open(location, "r:*") as tar:
            for member in tar:
                _, sep, rel = member.name.partition(TASKS_ROOT)
                source = _wanted(rel, paths) if sep and member.isfile() else None
                if source is not None:
                    fh = tar.extractfile(member)
                    found[source][rel[: -len("/task.json")]] = json.load(fh)
    else:
        raise FileNotFoundError(f"{location} is neither the {ARCHIVE_NAME} archive nor an unpacked BIG-bench folder")
    missing = [p for p, files in found.items() if not files]
    if missing:
        raise ValueError(f"no task.json for {', '.join(missing)} under {TASKS_ROOT} in {location}")
    return found


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() not in ("false", "0", "no", "")


def _single_correct(target_scores: dict) -> tuple[list[str], int] | None:
    """(choices, index of the correct one), or None unless exactly one choice has the best (positive) score."""
    items = [(str(k).strip(), v) for k, v in target_scores.items()]
    if len(items) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in items):
        return None
    choices = [k for k, _ in items]
    best = max(v for _, v in items)
    if best <= 0 or sum(v == best for _, v in items) != 1 or len(set(choices)) != len(choices) or "" in choices:
        return None
    return choices, next(i for i, (_, v) in enumerate(items) if v == best)


def json_task_docs(tasks: dict[str, dict], rng: random.Random) -> tuple[list[dict], str, str]:
    """Docs {query, choices, gold} of BIG-bench JSON tasks (one task, or the subtasks of one), the description
    (their shared ``task_prefix``, else put into each query) and the target delimiter."""
    tasks = {k: t for k, t in sorted(tasks.items()) if t.get("examples")}
    prefixes = {t.get("task_prefix", "") for t in tasks.values()}
    delimiters = set()
    docs = []
    for task in tasks.values():
        in_prefix = task.get("example_input_prefix", INPUT_PREFIX)
        out_prefix = task.get("example_output_prefix", OUTPUT_PREFIX)
        choice_prefix = task.get("choice_prefix", CHOICE_PREFIX)
        append = _truthy(task.get("append_choices_to_input", True))
        delimiters.add(out_prefix[len(out_prefix.rstrip()):] or " ")  # "\nA: " -> query "...\nA:", then " Yes"
        own_prefix = task.get("task_prefix", "") if len(prefixes) > 1 else ""
        for example in task["examples"]:
            picked = _single_correct(example.get("target_scores") or {})
            if picked is None or not str(example.get("input", "")).strip():
                continue
            choices, gold = picked
            order = list(range(len(choices)))
            rng.shuffle(order)
            choices, gold = [choices[i] for i in order], order.index(gold)
            listed = "".join(choice_prefix + c for c in choices) if append else ""
            query = (own_prefix + in_prefix + str(example["input"]).strip() + listed + out_prefix).strip()
            docs.append({"query": query, "choices": choices, "gold": gold})
    if len(delimiters) > 1:
        raise ValueError(f"subtasks {sorted(tasks)} end their prompts differently: build them one by one")
    description = prefixes.pop().lstrip() if len(prefixes) == 1 else ""
    if description and not description[-1].isspace():
        description += "\n"
    return docs, description, delimiters.pop() if delimiters else " "


_TWINS = re.compile(r"^Sentence 1:\s*(.*?)\s*\nAnswer1:\s*(.*?)\s*\nSentence 2:\s*(.*?)\s*\nAnswer2:\s*(.*?)\s*$", re.S)


def winogrande_docs(tasks: dict[str, dict], rng: random.Random) -> list[dict]:
    """WinoGrande-style docs from Natural Instructions' twin sentences: {sentence, option1, option2, contexts
    (the sentence up to the blank, with each option), continuation (the rest), gold}."""
    docs, seen = [], set()
    for task in tasks.values():
        for example in task.get("examples", []):
            for target in example.get("target") or []:
                match = _TWINS.match(str(target))
                if match is None:
                    continue
                s1, a1, s2, a2 = (g.strip() for g in match.groups())
                options = [a1.rstrip(". "), a2.rstrip(". ")]
                if not all(options) or options[0].lower() == options[1].lower():
                    continue
                for gold, sentence in enumerate((s1, s2)):
                    if sentence.count("_") != 1 or sentence in seen:
                        continue
                    if not all(o.lower() in sentence.lower() for o in options):
                        continue  # the options must be the two objects the sentence names
                    seen.add(sentence)
                    head, tail = sentence.split("_")
                    docs.append({"sentence": sentence, "option1": options[0], "option2": options[1],
                                 "contexts": [head + o for o in options], "continuation": tail.strip(), "gold": gold})
    rng.shuffle(docs)
    return docs


def task_config(name: str, source: Source, data: Path, description: str, delimiter: str, chance: float) -> dict:
    """The lm-eval task config of one BIG-bench task reading `data` (JSONL) as its test split."""
    config = {"task": name, "tag": [TAG], "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
              "output_type": "multiple_choice"}
    metrics = ["acc", "acc_norm"]
    if source.kind == "winogrande":  # the option sits in the context: only acc compares like with like
        config.update(doc_to_text="gold", doc_to_choice="contexts", doc_to_target="continuation")
        metrics = ["acc"]
    else:
        config.update(doc_to_text="{{query}}", doc_to_choice="choices", doc_to_target="gold")
        if description:
            config["description"] = description
    config["target_delimiter"] = delimiter
    config["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]
    config["metadata"] = {"version": 1.0, "bigbench_path": source.path, "main_metric": source.metric,
                          "chance": round(chance, 4)}
    return config


def build(location: Path, out: Path, names: Sequence[str] = DEFAULT_TASKS, max_examples: int = 300,
          seed: int = 1234) -> dict:
    """Write the selected BIG-bench tasks (YAML + JSONL) into `out`; returns (and writes) a manifest."""
    import yaml

    from eval.build_tasks import _Dumper  # the same YAML style as the local tasks

    selected = dict(source_for(n) for n in names)
    files = read_task_files(location, sorted({s.path for s in selected.values()}))
    (out / "data").mkdir(parents=True, exist_ok=True)
    manifest = {"source": str(location), "seed": seed, "max_examples": max_examples, "tag": TAG, "tasks": {}}
    for name, source in selected.items():
        rng = random.Random(f"{seed}-{name}")
        description, delimiter = "", " "
        if source.kind == "winogrande":
            docs = winogrande_docs(files[source.path], rng)
        else:
            docs, description, delimiter = json_task_docs(files[source.path], rng)
            rng.shuffle(docs)
        if not docs:
            raise ValueError(f"{source.path} has no multiple-choice items with a single correct answer")
        docs = docs[:max_examples]
        chance = sum(1 / len(d.get("choices") or d["contexts"]) for d in docs) / len(docs)
        data = out / "data" / f"{name}.jsonl"
        with data.open("w") as fh:
            fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        config = task_config(name, source, data, description, delimiter, chance)
        (out / f"{name}.yaml").write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
        manifest["tasks"][name] = {"path": source.path, "examples": len(docs), "chance": round(chance, 4),
                                   "main_metric": source.metric}
    previous = out / MANIFEST  # tasks built earlier (other selections) stay listed
    if previous.is_file():
        manifest["tasks"] = {**json.loads(previous.read_text()).get("tasks", {}), **manifest["tasks"]}
    previous.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def built_default_tasks(task_dir: Path) -> list[str]:
    """The default BIG-bench tasks whose YAML is in `task_dir` (what `eval/plan.py --local` adds)."""
    return [name for name in DEFAULT_TASKS if (task_dir / f"{name}.yaml").is_file()]
