"""Plan the lm-eval runs of `eval/run_all.sh`: which budgets, which tasks with which shots, what to skip.

Everything is checked here, from config.json and the task folder only, before any model is loaded: a budget
out of range or below the smallest the choices reach, a task that is neither in lm-eval's registry nor in the
local task folder, a checkpoint that is not LlamaFlex. Errors exit with code 2 and name what is allowed.

Budgets evaluated by default (docs/design.md, "Evaluation"):

* the explicit budgets (the trained ones, ``budgets`` in config.json);
* interpolated budgets: the midpoint of each pair of neighbouring explicit budgets, one between the largest
  and 1, and one below the smallest (half the first gap lower) when the choices reach it;
* 1.0, the full model (the reference line), and with ``--parent DIR`` the original plain Llama.

One lm-eval call runs per budget and shot count (lm-eval takes one ``--num_fewshot`` per call). Its results
go to ``OUTPUT/raw/<label>/<shots>shot/``, and once lm-eval has succeeded the call writes ``fingerprint.json``
there: what the results depend on (the model arguments and budget, --limit, --seed, each task's YAML and local
data files by hash, the checkpoint's config.json by hash and its weight files by size and mtime). A call is
skipped unless ``--force`` only when its results hold all its tasks *and* the folder's fingerprint is the one
the call would record now; otherwise it reruns, saying what differed. The plan is written as one line per call: a progress message, a tab, the shell-quoted command.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent

PAPER_TASKS = "arc_easy:0,lambada_openai:0,piqa:0,winogrande:0,mmlu:5,hellaswag:10"
LOCAL_TASKS = "flex_lambada:0,flex_hellaswag:0,flex_ppl:0"
DEFAULT_TASK_DIR = EVAL_DIR / "tasks" / "local"


def local_tasks(task_dir: Path) -> str:
    """--local's default: LOCAL_TASKS, plus the kept BIG-bench tasks (bb_*, 0-shot) built in `task_dir`
    (`python eval/build_tasks.py ... --bigbench`); a folder of BIG-bench tasks only gives just those."""
    from eval.bigbench_tasks import built_default_tasks

    bigbench = [f"{name}:0" for name in built_default_tasks(task_dir)]
    flex = [t for t in LOCAL_TASKS.split(",") if (task_dir / f"{t.partition(':')[0]}.yaml").is_file()]
    return ",".join(flex + bigbench) if bigbench else LOCAL_TASKS


class PlanError(ValueError):
    """A user error found while planning: printed without a traceback, exit code 2."""


@dataclass
class Run:
    """One lm-eval call: one model (a budget of the flex model, or the parent) and one shot count."""

    label: str  # "budget_0.5" or "parent"
    kind: str  # explicit | interpolated | full | parent
    budget: float | None
    shots: int
    tasks: list[str]
    out_dir: Path
    fingerprint: dict | None = None  # what its results depend on (recorded in out_dir/fingerprint.json)


def budget_label(budget: float) -> str:
    return f"budget_{budget:g}"


def load_flex_config(model_dir: Path):
    """The LlamaFlexConfig of a checkpoint, from its config.json only."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise PlanError(f"{model_dir} has no config.json: give the folder of a saved LlamaFlex checkpoint")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type != "llamaflex":
        raise PlanError(
            f"{model_dir} is a {model_type!r} checkpoint, not a LlamaFlex one (model_type 'llamaflex'); convert "
            "a Llama parent with `python -m modeling_llamaflex convert` and train it first"
        )
    from modeling_llamaflex import LlamaFlexConfig

    return LlamaFlexConfig.from_pretrained(model_dir)


def default_budgets(config) -> dict[float, str]:
    """Budget -> kind: explicit, interpolated (between, above and one below the explicit ones) and full."""
    from modeling_llamaflex.architecture import smallest_budget

    explicit = sorted({round(float(b), 4) for b in config.budgets if b < 1.0})
    kinds = {b: "explicit" for b in explicit}
    if explicit:
        pairs = list(zip(explicit[:-1], explicit[1:], strict=True))
        gaps = [b - a for a, b in pairs] or [1.0 - explicit[0]]
        points = [(a + b) / 2 for a, b in pairs] + [(explicit[-1] + 1.0) / 2]
        below = explicit[0] - gaps[0] / 2
        if below >= smallest_budget(config):
            points.append(below)
        for b in points:
            kinds.setdefault(round(b, 4), "interpolated")
    kinds[1.0] = "full"
    return dict(sorted(kinds.items()))


def check_budgets(config, budgets: list[str]) -> dict[float, str]:
    """Parse --budgets (fractions or sizes such as '350M'); refuse ones the choices cannot reach."""
    from modeling_llamaflex import parse_budget
    from modeling_llamaflex.architecture import smallest_budget

    low, parent = smallest_budget(config), config.parent_parameters()
    explicit = {round(float(b), 4) for b in config.budgets}
    kinds = {}
    for text in budgets:
        try:  # a plain number is a fraction (parse_budget reads a unit-less string above 1 as a size)
            value: float | str = float(text)
        except ValueError:
            value = text.strip()
        try:
            b = round(parse_budget(value, parent), 4)
        except (TypeError, ValueError) as err:
            raise PlanError(f"--budgets: {err}; allowed budgets are [{low:.4f}, 1]") from None
        if b < low:
            raise PlanError(
                f"--budgets: budget {text} ({b:.4g} of the parent) cannot be reached: the smallest sub-model these "
                f"choices allow keeps {low:.4f} of the parent's {parent:,} non-embedding parameters; allowed "
                f"budgets are [{low:.4f}, 1]"
            )
        kinds[b] = "full" if b >= 1.0 else "explicit" if b in explicit else "interpolated"
    return dict(sorted(kinds.items()))


def parse_tasks(spec: str, default_shots: int) -> dict[int, list[str]]:
    """'a:0,b,c:5' -> {0: [a, b], 5: [c]} (a name without ':N' takes `default_shots`)."""
    groups: dict[int, list[str]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, shots = item.partition(":")
        try:
            n = int(shots) if shots else default_shots
        except ValueError:
            raise PlanError(f"--tasks: {item!r}: the shot count after ':' must be an integer, e.g. mmlu:5") from None
        if n < 0:
            raise PlanError(f"--tasks: {item!r}: the shot count must be 0 or more")
        name = name.strip()
        other = [k for k, tasks in groups.items() if name in tasks and k != n]
        if other:
            raise PlanError(f"--tasks: {name} is given with {other[0]} and {n} shots: run them as separate outputs")
        groups.setdefault(n, [])
        if name not in groups[n]:
            groups[n].append(name)
    if not groups:
        raise PlanError("--tasks is empty: give task names such as arc_easy:0,mmlu:5")
    return groups


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def task_fingerprint(entry) -> dict:
    """What a task's results depend on: its YAML (by hash), its version, and its local data files (by hash)."""
    cfg = entry.cfg or {}
    fp: dict = {"version": (cfg.get("metadata") or {}).get("version")}
    if entry.yaml_path is not None and Path(entry.yaml_path).is_file():
        fp["yaml"] = _file_hash(Path(entry.yaml_path))
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    data = {}
    for split, path in sorted(files.items()) if isinstance(files, dict) else []:
        if isinstance(path, str) and Path(path).is_file():
            data[split] = _file_hash(Path(path))
    if data:
        fp["data_files"] = data
    return fp


def checkpoint_fingerprint(model_dir: Path) -> dict:
    """A checkpoint folder: its config.json by hash, its weight files by size and modification time."""
    fp: dict = {"path": str(model_dir)}
    config = model_dir / "config.json"
    if config.is_file():
        fp["config.json"] = _file_hash(config)
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = path.stat()
        fp[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return fp


FINGERPRINT = "fingerprint.json"


def read_fingerprint(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None


def fingerprint_changes(recorded: dict | None, now: dict) -> list[str]:
    """What differs between a results folder's recorded fingerprint and the one a run would record now."""
    if recorded is None:
        return [f"no {FINGERPRINT} (results of an interrupted run or of an earlier version)"]
    return [key for key in sorted(set(recorded) | set(now)) if recorded.get(key) != now.get(key)]


def check_tasks(groups: dict[int, list[str]], task_dir: Path | None,
                fingerprints: dict | None = None) -> tuple[dict[int, list[str]], bool]:
    """Every name must be in the task folder or in lm-eval's registry; tags expand to their tasks.

    Returns the expanded groups and whether every task comes from the task folder (then no hub is needed).
    With `fingerprints`, fills it with each expanded task's `task_fingerprint`.
    """
    import logging

    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names = [n for tasks in groups.values() for n in tasks]
    managers = []
    if task_dir is not None:
        if not task_dir.is_dir() or not any(task_dir.glob("*.yaml")):
            raise PlanError(
                f"task folder {task_dir} has no task YAML: build it with "
                f"`python eval/build_tasks.py --corpus_dir .cache/shakespeare --out {task_dir}`"
            )
        managers.append(TaskManager(include_path=str(task_dir), include_defaults=False))
    all_local = task_dir is not None and all(n in managers[0].task_index for n in names)
    if not all_local:
        managers.append(TaskManager(include_path=str(task_dir) if task_dir else None))
    index = managers[-1].task_index
    unknown = [n for n in names if n not in index]
    if unknown:
        local = sorted(managers[0].all_tasks) if task_dir is not None else []
        hints = {n: difflib.get_close_matches(n, list(index), n=3) for n in unknown}
        where = f"the task folder {task_dir} (which has {', '.join(local)})" if task_dir else "any --task_dir"
        raise PlanError(
            f"unknown task(s) {', '.join(unknown)}: not in lm-eval's registry nor in {where}. "
            + "".join(f"Did you mean {', '.join(h)} for {n}? " for n, h in hints.items() if h)
            + "`lm_eval ls tasks` lists the registry; eval/build_tasks.py builds the local tasks."
        )
    expanded = {}
    for shots, tasks in groups.items():
        out: list[str] = []
        for name in tasks:
            entry = index[name]
            members = sorted(entry.tags) if entry.kind == Kind.TAG else [name]
            out += [m for m in members if m not in out]
            for m in members:  # local tasks read absolute data_files written at build time
                files = ((index[m].cfg or {}).get("dataset_kwargs") or {}).get("data_files") or {}
                for path in files.values() if isinstance(files, dict) else []:
                    if index[m].cfg.get("dataset_path") == "json" and not Path(path).exists():
                        raise PlanError(f"task {m} reads {path}, which does not exist: rebuild the task folder "
                                        "with eval/build_tasks.py")
                if fingerprints is not None:
                    fingerprints[m] = task_fingerprint(index[m])
        expanded[shots] = out
    return expanded, all_local


def results_cover(out_dir: Path, tasks: list[str]) -> bool:
    """True if some lm-eval results file under `out_dir` holds results for every task."""
    for path in out_dir.glob("**/results_*.json"):
        try:
            results = json.loads(path.read_text()).get("results", {})
        except (OSError, ValueError):
            continue
        if all(t in results for t in tasks):
            return True
    return False


def build_plan(args: argparse.Namespace) -> tuple[list[tuple[Run, str]], Path | None, bool]:
    """Validate everything; return (run, model_args) pairs, the task folder, and whether all tasks are local."""
    model_dir = args.model_dir.resolve()
    config = load_flex_config(model_dir)
    budgets = check_budgets(config, args.budgets.split(",")) if args.budgets else default_budgets(config)
    task_dir = (args.task_dir or DEFAULT_TASK_DIR).resolve() if args.local or args.task_dir else None
    spec = args.tasks or (local_tasks(task_dir) if task_dir else PAPER_TASKS)
    task_fps: dict = {}
    groups, all_local = check_tasks(parse_tasks(spec, args.num_fewshot), task_dir, task_fps)
    output = (args.output or model_dir / "eval").resolve()
    common = f"trust_remote_code=True,dtype={args.dtype}"

    flex_fp = checkpoint_fingerprint(model_dir)
    models: list[tuple[str, str, float | None, str, dict]] = [
        (budget_label(b), kind, b, f"pretrained={model_dir},{common},budget={b!r}", flex_fp)
        for b, kind in budgets.items()
    ]
    if args.parent is not None:
        parent = args.parent.resolve()
        if not (parent / "config.json").is_file():
            raise PlanError(f"--parent {parent} has no config.json: give the folder of the plain Llama parent")
        files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        has_tokenizer = any((parent / f).is_file() for f in files)
        tokenizer = "" if has_tokenizer else f",tokenizer={model_dir}"
        models.append(("parent", "parent", None, f"pretrained={parent},dtype={args.dtype}{tokenizer}",
                       checkpoint_fingerprint(parent)))
    runs = []
    for label, kind, b, model_args, model_fp in models:
        for shots, tasks in sorted(groups.items()):
            fingerprint = {"model_args": model_args, "budget": b, "checkpoint": model_fp, "shots": shots,
                           "limit": args.limit, "seed": args.seed, "tasks": {t: task_fps.get(t) for t in tasks}}
            run = Run(label, kind, b, shots, tasks, output / "raw" / label / f"{shots}shot", fingerprint)
            runs.append((run, model_args))
    return runs, task_dir, all_local


def command(run: Run, model_args: str, args: argparse.Namespace, task_dir: Path | None, offline: bool) -> list[str]:
    """The lm-eval command line of one run (offline when every task is local: no hub is needed)."""
    cmd = ["env", "HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1"] if offline else []
    cmd += [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
            "--tasks", ",".join(run.tasks), "--num_fewshot", str(run.shots), "--batch_size", str(args.batch_size),
            "--device", args.device, "--output_path", str(run.out_dir), "--seed", str(args.seed)]
    if task_dir is not None:
        cmd += ["--include_path", str(task_dir)]
    if args.limit is not None:
        cmd += ["--limit", f"{args.limit:g}"]
    return cmd


def shell_line(run: Run, model_args: str, args: argparse.Namespace, task_dir: Path | None, offline: bool) -> str:
    """The lm-eval call, then (only if it succeeded) the writing of the run's fingerprint next to its results."""
    line = shlex.join(command(run, model_args, args, task_dir, offline))
    if run.fingerprint is not None:
        text = json.dumps(run.fingerprint, sort_keys=True)
        line += f" && printf '%s\\n' {shlex.quote(text)} > {shlex.quote(str(run.out_dir / FINGERPRINT))}"
    return line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plan (and validate) the lm-eval runs of eval/run_all.sh.")
    p.add_argument("model_dir", type=Path, help="a saved LlamaFlex checkpoint")
    p.add_argument("--tasks", help=f"comma-separated task[:shots] (default {PAPER_TASKS}; --local: {LOCAL_TASKS} "
                   "and the kept BIG-bench bb_* tasks built in the task folder)")
    p.add_argument("--num_fewshot", type=int, default=0, help="shots for tasks given without ':N' (default 0)")
    p.add_argument("--local", action="store_true", help=f"use the local task folder (default {DEFAULT_TASK_DIR})")
    p.add_argument("--task_dir", type=Path, help="local task folder built by eval/build_tasks.py (implies --local)")
    p.add_argument("--budgets", help="comma-separated budgets to evaluate instead of the default set (e.g. 0.5,0.6,1)")
    p.add_argument("--batch_size", default="1", help="lm-eval batch size: an integer, 'auto' or 'auto:N'")
    p.add_argument("--limit", type=float, help="at most this many examples per task (or a fraction < 1)")
    p.add_argument("--output", type=Path, help="results folder (default MODEL_DIR/eval)")
    p.add_argument("--device", default="cpu", help="torch device for lm-eval (default cpu)")
    p.add_argument("--dtype", default="float32", help="dtype the models are loaded in (default float32)")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval seed (python, numpy, torch, few-shot)")
    p.add_argument("--force", action="store_true", help="rerun budgets whose results already exist")
    p.add_argument("--parent", type=Path, help="also evaluate this plain Llama parent, as a reference")
    p.add_argument("--emit", type=Path, required=True, help="write the plan here (one line per lm-eval call)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    batch = args.batch_size
    if not (batch.isdigit() and int(batch) > 0) and not (batch == "auto" or batch.startswith("auto:")):
        print(f"error: --batch_size {batch!r}: give a positive integer, 'auto' or 'auto:N'", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit <= 0:
        print(f"error: --limit {args.limit:g}: give a positive count (or a fraction below 1)", file=sys.stderr)
        return 2
    try:
        runs, task_dir, offline = build_plan(args)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    labels = list(dict.fromkeys(run.label for run, _ in runs))
    lines = []
    for run, model_args in runs:
        i = labels.index(run.label) + 1
        what = f"budget {run.budget:g} ({run.kind})" if run.budget is not None else "parent (plain Llama)"
        head = f"[{i}/{len(labels)}] {what}, {run.shots}-shot {','.join(run.tasks)}"
        if not args.force and results_cover(run.out_dir, run.tasks):
            changes = fingerprint_changes(read_fingerprint(run.out_dir), run.fingerprint)
            if not changes:
                print(f"{head}: results exist in {run.out_dir}, skipping (--force recomputes)", file=sys.stderr)
                continue
            why = changes[0] if changes[0].startswith("no ") else f"made with another {', '.join(changes)}"
            print(f"{head}: results in {run.out_dir} are stale ({why}), rerunning", file=sys.stderr)
        lines.append(f"{head}\t{shell_line(run, model_args, args, task_dir, offline)}\n")
    args.emit.write_text("".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
