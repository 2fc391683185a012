"""Collect lm-eval results of `eval/run_all.sh` into results.json, results.md and accuracy_vs_params.png.

    python eval/collect.py OUTPUT_DIR MODEL_DIR

Reads every ``OUTPUT_DIR/raw/<label>/<shots>shot/**/results_*.json`` (the newest file wins per task), and for
each evaluated model (a budget of the flex model, or the parent) records its kind (explicit, interpolated,
full, parent), its architecture and non-embedding parameter count, the main metric of each task and the
average of the accuracy-type ones.

Architectures are computed **without loading the weights**: only the router tensors (``model.router.*``) are
read from the safetensors files and run through the same `architecture_for_logits` that loading at a budget
uses, so the table shows exactly the sub-model lm-eval evaluated. lm-eval's own parameter count (embeddings
included) is kept as ``total_parameters`` as a cross-check.

Main metric per task: the one a task's YAML names in ``metadata.main_metric`` (the BIG-bench tasks of
eval/bigbench_tasks.py do), ``acc_norm`` for HellaSwag-style tasks, else the first of acc, acc_norm,
exact_match, f1, mc2, nll_per_byte, word_perplexity, perplexity, bits_per_byte that the task reports (the local
``flex_ppl`` names ``nll_per_byte``, its per-document mean negative log-likelihood per byte, which, unlike the
corpus-level perplexities, has a standard error; ``word_perplexity`` and the others stay in ``all_metrics``).
Accuracy-type metrics are shown in percent and averaged; the others are shown as they are and left out of the
average. The table gives lm-eval's standard error beside each value ("44.5 ± 2.5") where lm-eval computed one;
results.json keeps the value (``metrics``) and the standard error (``stderr``) apart, and ``all_stderr`` for
every metric.

Neighbouring budgets of the flex model (sorted by budget; the parent left out) are compared task by task:
``neighbours`` in results.json and a second table in results.md give the difference of the main metric (larger
budget minus smaller), the combined standard error sqrt(se1² + se2²), their ratio z, and whether the
difference exceeds the combined standard error (z > 1). Both budgets are scored on the same items, so this
combined error, which ignores their correlation, is conservative: a paired comparison would be sharper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

PREFERRED = {"hellaswag": "acc_norm", "flex_hellaswag": "acc_norm"}
METRIC_ORDER = ("acc", "acc_norm", "exact_match", "f1", "mc2", "nll_per_byte", "word_perplexity", "perplexity",
                "bits_per_byte")
ACCURACY = {"acc", "acc_norm", "exact_match", "f1", "mc1", "mc2", "em"}
TASK_ORDER = ("arc_easy", "lambada_openai", "piqa", "winogrande", "mmlu", "hellaswag",
              "flex_lambada", "flex_hellaswag", "flex_ppl")
KIND_ORDER = {"explicit": 0, "interpolated": 0, "full": 1, "parent": 2}


def architectures(model_dir: Path, budgets: list[float]) -> tuple[dict[float, dict], int, list[float]]:
    """Architecture dicts of `budgets` from the router weights only; the parent's non-embedding parameters;
    the explicit (trained) budgets."""
    from modeling_llamaflex import LlamaFlexConfig
    from modeling_llamaflex.loading import router_architectures

    config = LlamaFlexConfig.from_pretrained(model_dir)
    out = {b: arch.to_dict() for b, arch in router_architectures(str(model_dir), config, budgets).items()}
    return out, config.parent_parameters(), [round(float(b), 4) for b in config.budgets]


def parent_architecture(parent_dir: Path) -> dict:
    """Sizes and non-embedding parameters of a plain Llama parent, from its config.json."""
    from transformers import AutoConfig

    from modeling_llamaflex import LlamaFlexConfig

    llama = AutoConfig.from_pretrained(parent_dir)
    flex = LlamaFlexConfig.from_llama_config(llama)
    return {"hidden": llama.hidden_size, "heads": llama.num_attention_heads, "mlp": llama.intermediate_size,
            "depth": llama.num_hidden_layers, "num_parameters": flex.parent_parameters()}


def read_raw(output: Path) -> dict[str, dict]:
    """label -> {model_args, total_parameters, limit, tasks: {task: {shots, metrics, higher_is_better, dataset}}}."""
    runs: dict[str, dict] = {}
    for path in sorted((output / "raw").glob("*/*shot/**/results_*.json"), key=lambda p: p.name):
        data = json.loads(path.read_text())
        label, shot_dir = path.relative_to(output / "raw").parts[:2]  # (a group's n-shot may only list subtasks)
        run = runs.setdefault(label, {"tasks": {}})
        run.update(model_args=data["config"]["model_args"], limit=data["config"].get("limit"),
                   total_parameters=data["config"].get("model_num_parameters"))
        subtasks = {t for members in data.get("group_subtasks", {}).values() for t in members}
        for task, values in data["results"].items():
            if task in subtasks:
                continue
            metrics, stderr = {}, {}
            for key, value in values.items():
                name, _, flt = key.partition(",")
                if flt and isinstance(value, (int, float)) and not isinstance(value, bool):
                    base = name.removesuffix("_stderr")
                    (stderr if base != name else metrics)[base if flt == "none" else f"{base},{flt}"] = value
            metadata = (data.get("configs", {}).get(task) or {}).get("metadata") or {}
            run["tasks"][task] = {"shots": int(shot_dir.removesuffix("shot")), "metrics": metrics,
                                  "stderr": stderr, "main_metric": metadata.get("main_metric"),
                                  "higher_is_better": data.get("higher_is_better", {}).get(task, {}),
                                  "dataset": _dataset(task, data)}
    return runs


def _dataset(task: str, data: dict) -> dict:
    """Where a task's data came from (for a group: its first subtask's), as lm-eval's config says."""
    configs, groups = data.get("configs", {}), data.get("group_subtasks", {})
    name = task
    while name not in configs and groups.get(name):
        name = groups[name][0]
    config = configs.get(name, {})
    path = config.get("dataset_path")
    local = path == "json"
    return {"path": task if local else path, "name": None if local else config.get("dataset_name"),
            "split": config.get("test_split") or config.get("validation_split"), "local": local}


def main_metric(task: str, metrics: dict, preferred: str | None = None) -> str | None:
    if preferred in metrics:  # the task's own choice (metadata.main_metric in its YAML)
        return preferred
    if PREFERRED.get(task) in metrics:
        return PREFERRED[task]
    return next((m for m in METRIC_ORDER if m in metrics), next(iter(metrics), None))


def collect(output: Path, model_dir: Path) -> dict:
    """Build the results.json content."""
    runs = read_raw(output)
    if not runs:
        raise FileNotFoundError(f"no lm-eval results under {output / 'raw'}: run eval/run_all.sh first")
    budgets = {label: float(run["model_args"]["budget"]) for label, run in runs.items() if label != "parent"}
    archs, parent_params, explicit = architectures(model_dir, sorted(set(budgets.values())))
    task_names = sorted({t for run in runs.values() for t in run["tasks"]},
                        key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))
    tasks = {}
    for t in task_names:
        info = next(run["tasks"][t] for run in runs.values() if t in run["tasks"])
        metric = main_metric(t, info["metrics"], info.get("main_metric"))
        tasks[t] = {"metric": metric, "shots": info["shots"], "accuracy": metric in ACCURACY,
                    "dataset": info["dataset"],
                    "higher_is_better": info["higher_is_better"].get(metric, metric in ACCURACY)}
    rows = []
    for label, run in runs.items():
        if label == "parent":
            arch, kind, budget = parent_architecture(Path(run["model_args"]["pretrained"])), "parent", None
        else:
            budget = budgets[label]
            arch = archs[budget]
            kind = "full" if budget >= 1.0 else "explicit" if round(budget, 4) in explicit else "interpolated"
        scores = {t: run["tasks"][t]["metrics"].get(tasks[t]["metric"]) for t in task_names if t in run["tasks"]}
        errors = {t: run["tasks"][t]["stderr"].get(tasks[t]["metric"]) for t in task_names if t in run["tasks"]}
        accs = [v for t, v in scores.items() if tasks[t]["accuracy"] and v is not None]
        rows.append({
            "label": label, "budget": budget, "kind": kind, "architecture": arch,
            "non_embedding_parameters": arch["num_parameters"],
            "fraction_of_parent": arch["num_parameters"] / parent_params,
            "total_parameters": run.get("total_parameters"), "limit": run.get("limit"),
            "metrics": scores, "stderr": errors, "average": sum(accs) / len(accs) if accs else None,
            "all_metrics": {t: run["tasks"][t]["metrics"] for t in task_names if t in run["tasks"]},
            "all_stderr": {t: run["tasks"][t]["stderr"] for t in task_names if t in run["tasks"]},
        })
    rows.sort(key=lambda r: (KIND_ORDER[r["kind"]], r["budget"] or 0))
    return {"model_dir": str(model_dir.resolve()), "parent_non_embedding_parameters": parent_params,
            "explicit_budgets": explicit, "tasks": tasks, "sub_models": rows,
            "neighbours": neighbours(rows, list(tasks))}


def _number(value) -> float | None:
    """A finite number, else None (missing, lm-eval's "N/A", NaN)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def neighbours(rows: list[dict], task_names: list[str]) -> list[dict]:
    """Each pair of neighbouring budgets (the parent left out): per task, the main metric's difference (larger
    budget minus smaller), the combined standard error sqrt(se1² + se2²), z = |difference| / combined, and
    whether the difference exceeds the combined standard error (None where a value or an error is missing)."""
    flex = sorted((r for r in rows if r["budget"] is not None), key=lambda r: r["budget"])
    pairs = []
    for low, high in zip(flex, flex[1:]):
        cells = {}
        for t in task_names:
            a, b = _number(low["metrics"].get(t)), _number(high["metrics"].get(t))
            if a is None or b is None:
                continue
            se_a, se_b = _number(low["stderr"].get(t)), _number(high["stderr"].get(t))
            combined = math.hypot(se_a, se_b) if se_a is not None and se_b is not None else None
            z = abs(b - a) / combined if combined else None
            cells[t] = {"difference": b - a, "combined_stderr": combined, "z": z,
                        "exceeds": None if z is None else z > 1}
        pairs.append({"from": low["label"], "to": high["label"], "budgets": [low["budget"], high["budget"]],
                      "tasks": cells})
    return pairs


def human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _decimals(stderr: float) -> int:
    """Decimals that show a standard error to two significant digits (and its value to the same place)."""
    return max(0, 1 - math.floor(math.log10(stderr)))


def fmt(value: float | None, accuracy: bool, stderr: float | None = None) -> str:
    """A table cell: accuracy in percent, else as it is; "± standard error" beside it when there is one (a
    non-accuracy value then to the standard error's two significant digits: "1.2345 ± 0.0072")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(stderr, (int, float)) and math.isfinite(stderr) and stderr > 0:
        if accuracy:
            return f"{100 * value:.1f} ± {100 * stderr:.1f}"
        places = _decimals(stderr)
        return f"{value:.{places}f} ± {stderr:.{places}f}"
    return f"{100 * value:.1f}" if accuracy else f"{value:.4g}"


def markdown(results: dict) -> str:
    """The table: budget, kind, architecture, non-embedding params, each task's main metric, average."""
    tasks = results["tasks"]
    head = ["budget", "kind", "architecture (hidden/heads/mlp/depth)", "non-emb. params"]
    for t, info in tasks.items():
        shots = f", {info['shots']}-shot" if info["shots"] else ""
        head.append(f"{t} ({info['metric']}{shots})")
    head.append("average acc")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(tasks) + 1)) + "|"]
    for row in results["sub_models"]:
        a = row["architecture"]
        cells = ["–" if row["budget"] is None else f"{row['budget']:g}", row["kind"],
                 f"{a['hidden']}/{a['heads']}/{a['mlp']}/{a['depth']}", human(row["non_embedding_parameters"])]
        errors = row.get("stderr") or {}  # (results.json files from before stderr was kept have none)
        cells += [fmt(row["metrics"].get(t), info["accuracy"], errors.get(t)) for t, info in tasks.items()]
        cells.append(fmt(row["average"], True))
        lines.append("| " + " | ".join(cells) + " |")
    limits = {row["limit"] for row in results["sub_models"]}
    note = ("Accuracy-type metrics in %, the others (nll_per_byte: nats per byte, perplexities) as they are, each "
            "± lm-eval's standard error where it gives one; the average is over the accuracy-type metrics. "
            "Non-embedding parameters from the routers' architecture for each budget.")
    if limits != {None}:
        note += f" Evaluated on at most {', '.join(f'{x:g}' for x in limits if x)} examples per task (--limit)."
    return "\n".join(lines) + "\n\n" + note + "\n" + neighbours_markdown(results)


def neighbours_markdown(results: dict) -> str:
    """The neighbouring-budget table: difference, z and ✓ where it exceeds the combined standard error."""
    pairs, tasks = results.get("neighbours") or [], results["tasks"]
    if not pairs:
        return ""
    head = ["budgets"] + [f"{t} ({info['metric']}{'' if info['higher_is_better'] else ', lower is better'})"
                          for t, info in tasks.items()]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(tasks)]
    for pair in pairs:
        cells = [" → ".join(f"{b:g}" for b in pair["budgets"])]
        for t, info in tasks.items():
            cell = pair["tasks"].get(t)
            if cell is None:
                cells.append("–")
                continue
            d, combined = cell["difference"], cell["combined_stderr"]
            text = (f"{100 * d:+.1f}" if info["accuracy"] else
                    f"{d:+.{_decimals(combined)}f}" if combined else f"{d:+.2g}")
            text += " (no SE)" if cell["z"] is None else f" (z {cell['z']:.1f}){' ✓' if cell['exceeds'] else ''}"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Neighbouring budgets: difference of each main metric (larger budget minus smaller; accuracy in "
            "points), z = |difference| / sqrt(se1² + se2²), ✓ where the difference exceeds that combined standard "
            "error (z > 1; z > 2 is the usual bar for a clear difference). The same items score both budgets, so "
            "this combined error is conservative.")
    return "\n" + "\n".join(lines) + "\n\n" + note + "\n"


def _panel(ax, rows: list[dict], value, error, ylabel: str, title: str) -> None:
    """One metric against non-embedding parameters: the family as a line with error bars, references as lines."""
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if value(r) is not None]
    family = sorted((r for r in rows if r["kind"] in ("explicit", "interpolated")),
                    key=lambda r: r["non_embedding_parameters"])
    if family:
        ax.plot([r["non_embedding_parameters"] for r in family], [value(r) for r in family], color="0.7", zorder=1)
    for kind, marker, fill in (("explicit", "o", "C0"), ("interpolated", "D", "none")):
        pts = [r for r in family if r["kind"] == kind]
        if pts:
            ax.errorbar([r["non_embedding_parameters"] for r in pts], [value(r) for r in pts],
                        yerr=[error(r) or 0.0 for r in pts], fmt="none", ecolor="C0", alpha=0.5, zorder=1)
            ax.scatter([r["non_embedding_parameters"] for r in pts], [value(r) for r in pts], marker=marker,
                       s=45, facecolors=fill, edgecolors="C0", zorder=2, label=f"{kind} budgets")
        for r in pts:
            ax.annotate(f"{r['budget']:g}", (r["non_embedding_parameters"], value(r)),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    references = (("full", "--", "C3", "full model (budget 1)"), ("parent", ":", "C2", "parent (plain Llama)"))
    for kind, style, color, text in references:
        for r in (r for r in rows if r["kind"] == kind):
            ax.axhline(value(r), linestyle=style, color=color, label=f"{text}: {value(r):.4g}")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human(int(x))))
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, loc="best")


def plot(results: dict, path: Path) -> None:
    """Average accuracy vs non-embedding parameters, and one panel per non-accuracy task (e.g. flex_ppl's
    per-document loss, with its standard error); full model (and parent) as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["sub_models"]
    others = [t for t, i in results["tasks"].items() if not i["accuracy"]]
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(6.4 * (1 + len(others)), 4.2), dpi=120, squeeze=False)
    accuracy = ", ".join(t for t, i in results["tasks"].items() if i["accuracy"])
    _panel(axes[0][0], rows, lambda r: None if r["average"] is None else 100 * r["average"], lambda r: None,
           "average accuracy (%)", f"Accuracy vs size ({accuracy})")
    for ax, task in zip(axes[0][1:], others):
        metric = results["tasks"][task]["metric"]
        better = "lower" if results["tasks"][task].get("higher_is_better") is False else "higher"
        _panel(ax, rows, lambda r, t=task: (r.get("metrics") or {}).get(t),
               lambda r, t=task: (r.get("stderr") or {}).get(t), f"{metric} ({better} is better)",
               f"{task} vs size (± standard error)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Collect lm-eval results of eval/run_all.sh into a table and a plot.")
    parser.add_argument("output", type=Path, help="the --output folder of run_all.sh (holds raw/)")
    parser.add_argument("model_dir", type=Path, help="the LlamaFlex checkpoint that was evaluated")
    args = parser.parse_args(argv)
    try:
        results = collect(args.output, args.model_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown(results)
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", table)):
        tmp = args.output / f".{name}.tmp"  # atomic: a crash never leaves a half-written table
        tmp.write_text(text)
        os.replace(tmp, args.output / name)
    plot(results, args.output / "accuracy_vs_params.png")
    print(table)
    print(f"wrote {args.output / 'results.json'}, results.md and accuracy_vs_params.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
