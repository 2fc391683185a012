"""Evaluation: local task building, planning and validation, collecting results, and (slow) the whole
`eval/run_all.sh` on a tiny checkpoint with lm-eval, offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, fake_output, fake_results, make_checkpoint

from eval import build_tasks, collect, plan
from modeling_llamaflex import LlamaFlexForCausalLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def task_dir(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    assert build_tasks.main(["--text", str(checkpoint[2]), "--out", str(out), "--max_examples", "12"]) == 0
    return out


class _TaskLoader(yaml.SafeLoader):
    """Reads the task YAML, keeping `!function module.name` (flex_ppl's process_results) as a string."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506 (a SafeLoader)


def run_all(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(["bash", str(ROOT / "eval" / "run_all.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ---- build_tasks ----

def test_build_tasks_is_seeded_and_well_formed(task_dir, checkpoint, tmp_path):
    again = tmp_path / "again"
    build_tasks.main(["--text", str(checkpoint[2]), "--out", str(again), "--max_examples", "12"])
    for name in build_tasks.TASKS:
        rows = (task_dir / "data" / f"{name}.jsonl").read_text()
        assert rows == (again / "data" / f"{name}.jsonl").read_text(), f"{name} is not reproducible"
        rows = [json.loads(line) for line in rows.splitlines()]
        assert 0 < len(rows) <= 12
        config = read_task_yaml(task_dir / f"{name}.yaml")
        assert config["dataset_path"] == "json" and config["tag"] == [build_tasks.TAG]
        assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    for row in map(json.loads, (task_dir / "data" / "flex_hellaswag.jsonl").read_text().splitlines()):
        assert len(row["choices"]) == 4 and 0 <= row["gold"] < 4 and len(set(row["choices"])) == 4
        assert not row["query"].startswith("[")
    for row in map(json.loads, (task_dir / "data" / "flex_lambada.jsonl").read_text().splitlines()):
        assert row["text"].split(" ")[-1].isalpha() and "[" not in row["text"]
    other = tmp_path / "other"
    build_tasks.main(["--text", str(checkpoint[2]), "--out", str(other), "--max_examples", "12", "--seed", "7"])
    first = (task_dir / "data" / "flex_hellaswag.jsonl").read_text()
    assert (other / "data" / "flex_hellaswag.jsonl").read_text() != first


def test_lm_eval_indexes_the_local_tasks(task_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert set(build_tasks.TASKS) | {build_tasks.TAG} == set(manager.all_tasks)
    loaded = manager.load_task_or_group(list(build_tasks.TASKS))
    assert set(loaded) == set(build_tasks.TASKS)
    docs = list(loaded["flex_lambada"].test_docs())
    assert len(docs) > 0 and loaded["flex_hellaswag"].OUTPUT_TYPE == "multiple_choice"


def test_ppl_docs_merge_short_remainders_and_are_shuffled():
    texts = ["\n\n".join(f"{name} block {i} " + "x" * 90 for i in range(n)) for name, n in (("a", 41), ("b", 33))]
    docs = build_tasks.ppl_docs(texts, random.Random(0), 300, chunk_chars=1000)
    assert sorted(len(d["text"]) for d in docs)[0] >= 1000  # 41 and 33 blocks: remainders of 1 and 3 merged
    assert "".join(d["text"] for d in docs).count("block") == 41 + 33  # nothing lost
    assert docs == build_tasks.ppl_docs(texts, random.Random(0), 300, chunk_chars=1000)  # seeded
    first = [d["text"][0] for d in docs[:4]]
    assert first != sorted(first), "corpus order: --limit would only score the first text"


def test_flex_ppl_has_a_per_document_metric_with_a_standard_error(task_dir, tmp_path):
    """flex_ppl.yaml's process_results (flex_ppl_utils.py, next to it) is found by lm-eval and gives
    nll_per_byte (mean, so a standard error) besides the corpus-level perplexities."""
    import math
    import statistics

    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    assert (task_dir / "flex_ppl_utils.py").is_file()
    config = read_task_yaml(task_dir / "flex_ppl.yaml")
    assert config["process_results"] == "!function flex_ppl_utils.process_results"
    assert config["metadata"]["main_metric"] == "nll_per_byte"
    task = TaskManager(include_path=str(task_dir), include_defaults=False).load_task_or_group(["flex_ppl"])["flex_ppl"]
    docs = list(task.test_docs())
    assert len(docs) > 1
    target = task.doc_to_target(docs[0])
    assert target == docs[0]["text"]
    n_bytes, n_words = task.count_bytes(target), task.count_words(target)
    scores = task.process_results(docs[0], [-2.0 * n_bytes])
    assert scores == {"nll_per_byte": pytest.approx(2.0), "word_perplexity": (-2.0 * n_bytes, n_words),
                      "byte_perplexity": (-2.0 * n_bytes, n_bytes), "bits_per_byte": (-2.0 * n_bytes, n_bytes)}
    assert task.higher_is_better() == dict.fromkeys(scores, False)
    assert task.aggregation()["nll_per_byte"].__name__ == "mean"

    class Rolling(LM):  # nats per byte 1.0, 1.5, 2.0, 1.0, ... by document
        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return [-(1.0 + 0.5 * (i % 3)) * len(r.arguments[0].encode()) for i, r in enumerate(requests)]

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = simple_evaluate(model=Rolling(), tasks=["flex_ppl"], task_manager=manager, bootstrap_iters=10)
    values = [1.0 + 0.5 * (i % 3) for i in range(len(docs))]
    got = results["results"]["flex_ppl"]
    assert got["nll_per_byte,none"] == pytest.approx(statistics.mean(values))
    assert got["nll_per_byte_stderr,none"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    total_ll = sum(-v * len(d["text"].encode()) for v, d in zip(values, docs, strict=True))
    words = sum(task.count_words(d["text"]) for d in docs)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words))
    assert got["bits_per_byte,none"] == pytest.approx(-total_ll / sum(len(d["text"].encode()) for d in docs)
                                                      / math.log(2))
    assert got["word_perplexity_stderr,none"] == "N/A"

    raw = tmp_path / "eval" / "raw" / "budget_1" / "0shot" / "m" / "results_2026-01-01T00-00-00.json"
    raw.parent.mkdir(parents=True)
    raw.write_text(json.dumps({k: results[k] for k in ("results", "configs", "config")}, default=str))
    read = collect.read_raw(tmp_path / "eval")["budget_1"]["tasks"]["flex_ppl"]
    assert read["main_metric"] == "nll_per_byte"
    assert read["stderr"] == {"nll_per_byte": got["nll_per_byte_stderr,none"]}


def test_build_tasks_refuses_text_without_speeches(tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("Just some prose without any speakers at all.\n\nAnother paragraph of prose.\n")
    with pytest.raises(ValueError, match="speeches"):
        build_tasks.main(["--text", str(text), "--out", str(tmp_path / "t")])


# ---- plan ----

def test_default_budgets_explicit_interpolated_full(checkpoint):
    config = plan.load_flex_config(checkpoint[0])
    assert plan.default_budgets(config) == {
        0.375: "interpolated", 0.5: "explicit", 0.625: "interpolated", 0.75: "explicit", 0.875: "interpolated",
        1.0: "full",
    }
    config.budgets = [0.12, 0.5]  # half a gap below 0.12 is below the smallest reachable budget: left out
    assert plan.default_budgets(config) == {0.12: "explicit", 0.31: "interpolated", 0.5: "explicit",
                                            0.75: "interpolated", 1.0: "full"}


def test_parse_tasks_groups_by_shots():
    assert plan.parse_tasks("arc_easy:0, piqa, mmlu:5,hellaswag:10", 0) == {0: ["arc_easy", "piqa"], 5: ["mmlu"],
                                                                         10: ["hellaswag"]}
    with pytest.raises(plan.PlanError, match="integer"):
        plan.parse_tasks("mmlu:five", 0)
    with pytest.raises(plan.PlanError, match="given with 0 and 5 shots"):
        plan.parse_tasks("mmlu:0,mmlu:5", 0)


def test_plan_emits_one_call_per_budget_and_skips_finished_ones(checkpoint, task_dir, tmp_path):
    out, emit = tmp_path / "out", tmp_path / "plan.txt"
    args = [str(checkpoint[0]), "--task_dir", str(task_dir), "--output", str(out), "--emit", str(emit),
            "--tasks", "flex_lambada,llamaflex_local:2", "--budgets", "0.5,0.6,1", "--limit", "3"]
    assert plan.main(args) == 0
    lines = emit.read_text().splitlines()
    assert len(lines) == 6  # 3 budgets x 2 shot groups; the tag expands to its tasks
    assert lines[0].startswith("[1/3] budget 0.5 (explicit), 0-shot flex_lambada\t")
    assert "budget 0.6 (interpolated), 2-shot flex_hellaswag,flex_lambada,flex_ppl" in lines[3]
    assert "budget=0.6" in lines[3] and "HF_HUB_OFFLINE=1" in lines[3] and "--limit 3" in lines[3]
    assert not out.exists()
    done = out / "raw" / "budget_0.5" / "0shot" / "m" / "results_2026-01-01T00-00-00.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"results": {"flex_lambada": {"acc,none": 0.5}}}))
    assert plan.main(args) == 0
    assert len(emit.read_text().splitlines()) == 6  # results without the fingerprint of a finished call: rerun
    record = lines[0].split("\t", 1)[1].split(" && ", 1)[1]  # what the call runs once lm-eval has succeeded
    subprocess.run(["bash", "-c", record], check=True)
    assert plan.main(args) == 0
    assert len(emit.read_text().splitlines()) == 5
    assert plan.main(args + ["--force"]) == 0
    assert len(emit.read_text().splitlines()) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "0.01"], "allowed budgets are [0.1028, 1]"),
        (["--budgets", "1.5"], "outside (0, 1]"),
        (["--budgets", "half"], "is not a number"),
        (["--tasks", "flex_lambda"], "unknown task(s) flex_lambda: not in lm-eval's registry nor in the task folder"),
    ],
)
def test_run_all_refuses_bad_budgets_and_tasks_before_loading(checkpoint, task_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    result = run_all(str(checkpoint[0]), "--task_dir", str(task_dir), "--output", str(out), *extra, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "lm_eval run" not in result.stdout
    assert not out.exists()


def test_run_all_refuses_a_plain_llama_and_a_missing_task_folder(checkpoint, tmp_path):
    result = run_all(str(checkpoint[1]), "--local", "--task_dir", str(tmp_path / "none"), timeout=120)
    assert result.returncode == 2 and "not a LlamaFlex one" in result.stderr
    result = run_all(str(checkpoint[0]), "--task_dir", str(tmp_path / "none"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "build it with" in result.stderr and not (tmp_path / "o").exists()


# ---- collect (on lm-eval-shaped results, no lm-eval run) ----

def test_collect_table_and_plot(checkpoint, tmp_path):
    model_dir, parent_dir, _ = checkpoint
    out = tmp_path / "eval"
    fake_output(out, model_dir, parent_dir)
    assert collect.main([str(out), str(model_dir)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["mmlu", "flex_lambada", "flex_ppl"]
    assert results["tasks"]["mmlu"]["shots"] == 5 and results["tasks"]["flex_ppl"]["metric"] == "nll_per_byte"
    assert results["tasks"]["flex_ppl"]["higher_is_better"] is False and not results["tasks"]["flex_ppl"]["accuracy"]
    rows = {r["label"]: r for r in results["sub_models"]}
    assert [r["kind"] for r in results["sub_models"]] == ["interpolated", "explicit", "interpolated", "full", "parent"]
    flex = LlamaFlexForCausalLM.from_pretrained(model_dir)
    for b in (0.375, 0.5, 0.625, 1.0):
        row = rows[plan.budget_label(b)]
        assert row["architecture"] == flex.architecture(b).to_dict()
        assert row["non_embedding_parameters"] == flex.architecture(b).num_parameters
    assert rows["budget_0.5"]["metrics"] == {"mmlu": 0.26, "flex_lambada": 0.9, "flex_ppl": 1.55}
    assert rows["budget_0.5"]["stderr"]["flex_ppl"] == 0.01
    assert rows["budget_0.5"]["all_metrics"]["flex_ppl"]["word_perplexity"] == 99.0  # kept, not the main one
    assert rows["budget_0.5"]["average"] == pytest.approx((0.26 + 0.9) / 2)  # nll_per_byte left out
    pairs = {(p["from"], p["to"]): p["tasks"] for p in results["neighbours"]}
    assert list(pairs) == [("budget_0.375", "budget_0.5"), ("budget_0.5", "budget_0.625"),
                           ("budget_0.625", "budget_1")]  # the parent is no budget
    step = pairs[("budget_0.375", "budget_0.5")]["flex_ppl"]
    assert step["difference"] == pytest.approx(-0.05) and step["combined_stderr"] == pytest.approx(0.01 * 2 ** 0.5)
    assert step["z"] == pytest.approx(3.54, abs=0.01) and step["exceeds"] is True
    assert pairs[("budget_0.625", "budget_1")]["flex_ppl"]["exceeds"] is False  # 0.005 < 0.014
    assert pairs[("budget_0.375", "budget_0.5")]["mmlu"]["exceeds"] is None  # no standard error
    assert rows["parent"]["non_embedding_parameters"] == flex.config.parent_parameters()
    table = (out / "results.md").read_text()
    cells = ("| 0.375 | interpolated |", "| 0.5 | explicit |", "| 1 | full |", "| – | parent |", "mmlu (acc, 5-shot)",
             "flex_ppl (nll_per_byte)", "| 1.550 ± 0.010 |", "| 1.495 ± 0.010 |",
             "| budgets | mmlu (acc) | flex_lambada (acc) | flex_ppl (nll_per_byte, lower is better) |",
             "| 0.375 → 0.5 | +1.0 (no SE) | +90.0 (no SE) | -0.050 (z 3.5) ✓ |",
             "| 0.625 → 1 | +1.0 (no SE) | +10.0 (z 7.1) ✓ | -0.005 (z 0.4) |")
    assert all(cell in table for cell in cells), table
    assert (out / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_collect_without_results_says_so(checkpoint, tmp_path, capsys):
    assert collect.main([str(tmp_path), str(checkpoint[0])]) == 2
    assert "run eval/run_all.sh first" in capsys.readouterr().err


def test_collect_shows_the_standard_error_and_a_tasks_own_main_metric(checkpoint, tmp_path):
    model_dir = checkpoint[0]
    out = tmp_path / "eval"
    fake_results(out, plan.budget_label(1.0), {"pretrained": str(model_dir), "budget": 1.0}, {
        "bb_social_iqa": {"acc,none": 0.37, "acc_stderr,none": 0.0242, "acc_norm,none": 0.445,
                          "acc_norm_stderr,none": 0.0249},
        "flex_hellaswag": {"acc,none": 0.3, "acc_stderr,none": 0.02, "acc_norm,none": 0.31,
                           "acc_norm_stderr,none": "N/A"},
        "flex_ppl": {"word_perplexity,none": 120.0, "word_perplexity_stderr,none": "N/A"},
    })
    path = next(out.glob("raw/**/results_*.json"))
    data = json.loads(path.read_text())
    data["configs"]["bb_social_iqa"]["metadata"] = {"version": 1.0, "main_metric": "acc_norm"}  # as its YAML says
    path.write_text(json.dumps(data))
    assert collect.main([str(out), str(model_dir)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["bb_social_iqa"]["metric"] == "acc_norm"
    row = results["sub_models"][0]
    assert row["metrics"]["bb_social_iqa"] == 0.445 and row["stderr"]["bb_social_iqa"] == 0.0249
    assert row["all_stderr"]["bb_social_iqa"] == {"acc": 0.0242, "acc_norm": 0.0249}
    assert row["stderr"]["flex_hellaswag"] is None and row["stderr"]["flex_ppl"] is None  # lm-eval's "N/A"
    table = (out / "results.md").read_text()
    assert "| 31.0 | 120 | 44.5 ± 2.5 | 37.8 |" in table and "bb_social_iqa (acc_norm)" in table, table
    assert collect.fmt(0.5, True, 0.0123) == "50.0 ± 1.2" and collect.fmt(3.25, False, 0.5) == "3.25 ± 0.50"
    assert collect.fmt(1.23456, False, 0.00723) == "1.2346 ± 0.0072" and collect.fmt(503.2, False, 12.3) == "503 ± 12"


# ---- the whole pipeline with lm-eval (slow: one lm-eval process per budget) ----

@pytest.mark.slow
def test_run_all_end_to_end_with_local_tasks(checkpoint, task_dir, tmp_path):
    from conftest import check_card

    model_dir, parent_dir, _ = checkpoint
    out = tmp_path / "eval"
    args = [str(model_dir), "--local", "--task_dir", str(task_dir), "--limit", "4", "--batch_size", "4",
            "--output", str(out), "--parent", str(parent_dir)]
    result = run_all(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/7] budget 0.5 (explicit)" in result.stdout and "[7/7] parent" in result.stdout
    results = json.loads((out / "results.json").read_text())
    kinds = {r["label"]: r["kind"] for r in results["sub_models"]}
    assert kinds == {"budget_0.375": "interpolated", "budget_0.5": "explicit", "budget_0.625": "interpolated",
                     "budget_0.75": "explicit", "budget_0.875": "interpolated", "budget_1": "full", "parent": "parent"}
    assert list(results["tasks"]) == ["flex_lambada", "flex_hellaswag", "flex_ppl"]
    for row in results["sub_models"]:
        assert set(row["metrics"]) == set(results["tasks"]) and row["average"] is not None
        arch = row["architecture"]  # lm-eval's own count: non-embedding + embeddings + untied lm_head
        assert row["total_parameters"] == row["non_embedding_parameters"] + 2 * 300 * arch["hidden"]
    full, parent = results["sub_models"][-2:]
    assert full["metrics"] == pytest.approx(parent["metrics"])  # an untrained flex model at budget 1 is its parent
    table = (out / "results.md").read_text()
    assert all(f"| {b} | " in table for b in ("0.375", "0.5", "0.625", "0.75", "0.875", "1"))
    assert (out / "accuracy_vs_params.png").stat().st_size > 1000

    again = run_all(*args)
    assert again.returncode == 0 and "0 lm-eval call(s) to run" in again.stdout
    assert again.stderr.count("skipping") == 7
    check_card(model_dir, out / "results.json", tmp_path / "card" / "README.md")
