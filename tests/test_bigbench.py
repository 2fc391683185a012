"""BIG-bench tasks offline (eval/bigbench_tasks.py, `build_tasks.py --bigbench`): a tiny fake bigbench source
archive, the JSONL + YAML it gives, lm-eval loading and scoring them (with a scripted LM, no model), and
`eval/plan.py --local` picking them up."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import play_text

from eval import bigbench_tasks as bb
from eval import build_tasks, collect, plan

TOP = "bigbench-1.0.0/bigbench/benchmark_tasks"

SOCIAL = {  # BIG-bench's default prompt format; one item with two correct answers, one with none
    "name": "social_iqa", "append_choices_to_input": True,
    "examples": [
        {"input": f"Question {i}? ", "target_scores": {f"right {i}": 1, f"wrong {i}": 0, f"other {i}": 0}}
        for i in range(6)
    ] + [
        {"input": "Two right?", "target_scores": {"a": 1, "b": 1, "c": 0}},
        {"input": "None right?", "target_scores": {"a": 0, "b": 0}},
    ],
}
WINOWHY = {  # task_prefix, example_input_prefix, example_output_prefix; choices not listed in the input
    "name": "winowhy", "append_choices_to_input": "false",
    "task_prefix": "Please answer the following questions.\n", "example_input_prefix": "\n",
    "example_output_prefix": "\nThe above reasoning is ",
    "examples": [{"input": f"Reason {i}.", "target_scores": {"correct": i % 2, "incorrect": 1 - i % 2}}
                 for i in range(4)],
}
GOAL = {"name": "goal_inference", "examples": [{"input": f"Goal {i}", "target_scores": {"G": 1, "H": 0}}
                                               for i in range(3)]}
STEP = {"name": "step_inference", "examples": [{"input": f"Step {i}", "target_scores": {"S": 0, "T": 1}}
                                               for i in range(2)]}
TWINS = {"name": "subtask029_winogrande_full_object", "examples": [
    {"input": "Context Word: pink.", "target": [
        "Sentence 1: The pink shirt went with her shoes but not her pants, since the _ matched. \nAnswer1: shoes. "
        "\nSentence 2: The pink shirt went with her shoes but not her pants, since the _ clashed. \nAnswer2: pants."]},
    {"input": "Context Word: x.", "target": ["not a twin pair"]},
]}


def fake_archive(path: Path) -> Path:
    """A .tar.gz laid out like PyPI's bigbench-1.0.0 sdist, with a few task.json files (and other files)."""
    files = {f"{TOP}/social_iqa/task.json": SOCIAL, f"{TOP}/winowhy/task.json": WINOWHY,
             f"{TOP}/goal_step_wikihow/goal_inference/task.json": GOAL,
             f"{TOP}/goal_step_wikihow/step_inference/task.json": STEP,
             f"{TOP}/natural_instructions/task.json": {"name": "natural_instructions"},
             f"{TOP}/natural_instructions/subtask029_winogrande_full_object/task.json": TWINS,
             f"{TOP}/social_iqa/README.md": "not json", "bigbench-1.0.0/setup.py": "print()"}
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = (content if isinstance(content, str) else json.dumps(content)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigbench")
    archive = fake_archive(root / "bigbench-1.0.0.tar.gz")
    out = root / "tasks"
    names = "bb_social_iqa,winowhy,goal_step_wikihow,bb_winogrande"
    assert build_tasks.main(["--bigbench", str(archive), "--bigbench_tasks", names, "--out", str(out),
                             "--max_examples", "5"]) == 0
    return archive, out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_builder_writes_jsonl_and_yaml(built):
    archive, out = built
    docs = read_jsonl(out / "data" / "bb_social_iqa.jsonl")
    assert len(docs) == 5  # 6 single-answer items, capped; the two-answer and no-answer items are skipped
    for doc in docs:
        i = doc["query"].split("Question ")[1].split("?")[0]
        assert doc["query"] == f"Q: Question {i}?" + "".join(f"\n  choice: {c}" for c in doc["choices"]) + "\nA:"
        assert doc["choices"][doc["gold"]] == f"right {i}" and sorted(doc["choices"]) == sorted(
            [f"right {i}", f"wrong {i}", f"other {i}"])
    config = yaml.safe_load((out / "bb_social_iqa.yaml").read_text())
    assert config["task"] == "bb_social_iqa" and config["tag"] == [bb.TAG] and config["dataset_path"] == "json"
    assert config["output_type"] == "multiple_choice" and config["target_delimiter"] == " "
    assert config["dataset_kwargs"]["data_files"]["test"] == str((out / "data" / "bb_social_iqa.jsonl").resolve())
    assert (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == ("{{query}}", "choices", "gold")
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    assert config["metadata"]["main_metric"] == "acc_norm" and config["metadata"]["chance"] == 0.3333

    why = yaml.safe_load((out / "bb_winowhy.yaml").read_text())
    assert why["description"] == "Please answer the following questions.\n" and why["metadata"]["main_metric"] == "acc"
    assert read_jsonl(out / "data" / "bb_winowhy.jsonl")[0]["query"].endswith(".\nThe above reasoning is")
    subtasks = read_jsonl(out / "data" / "bb_goal_step_wikihow.jsonl")  # both subtasks, merged
    assert sorted(d["query"].split("\n")[0] for d in subtasks) == ["Q: Goal 0", "Q: Goal 1", "Q: Goal 2",
                                                                    "Q: Step 0", "Q: Step 1"]
    assert sorted(d["choices"][d["gold"]] for d in subtasks) == ["G", "G", "G", "T", "T"]
    twins = read_jsonl(out / "data" / "bb_winogrande.jsonl")
    assert sorted((d["gold"], d["continuation"]) for d in twins) == [(0, "matched."), (1, "clashed.")]
    assert twins[0]["contexts"][1].endswith("since the pants") and twins[0]["option1"] == "shoes"
    manifest = json.loads((out / bb.MANIFEST).read_text())
    assert manifest["tasks"]["bb_social_iqa"]["examples"] == 5 and manifest["tasks"]["bb_winogrande"]["chance"] == 0.5

    again = out.parent / "again"  # seeded: the same archive and seed give the same files; a folder works too
    assert build_tasks.main(["--bigbench", str(archive), "--bigbench_tasks", "social_iqa", "--out", str(again),
                             "--max_examples", "5"]) == 0
    assert (again / "data" / "bb_social_iqa.jsonl").read_text() == (out / "data" / "bb_social_iqa.jsonl").read_text()
    unpacked = out.parent / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    bb.build(unpacked, out.parent / "from_dir", ["social_iqa"], max_examples=5)
    assert read_jsonl(out.parent / "from_dir" / "data" / "bb_social_iqa.jsonl") == docs


def test_builder_errors(built, tmp_path, capsys):
    archive, _ = built
    with pytest.raises(SystemExit):
        build_tasks.main(["--bigbench", str(archive), "--bigbench_tasks", "bb_nope", "--out", str(tmp_path)])
    assert "unknown BIG-bench task 'bb_nope'" in capsys.readouterr().err
    assert build_tasks.main(["--bigbench", str(archive), "--bigbench_tasks", "hyperbaton", "--out", str(tmp_path)]) == 2
    assert "no task.json for hyperbaton" in capsys.readouterr().err
    assert build_tasks.main(["--bigbench", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path)]) == 2
    assert "neither the bigbench-1.0.0.tar.gz archive" in capsys.readouterr().err


def test_fetch_says_what_to_do_without_an_index(tmp_path, monkeypatch):
    import subprocess

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for bigbench==1.0.0"

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Failed())
    with pytest.raises(RuntimeError, match="no package index with bigbench==1.0.0 was reachable"):
        bb.fetch_bigbench(tmp_path)
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-3:] == ["-d", str(tmp_path),
                                                                                          "bigbench==1.0.0"]
    (tmp_path / bb.ARCHIVE_NAME).write_bytes(b"")  # present: no download
    assert bb.fetch_bigbench(tmp_path) == tmp_path / bb.ARCHIVE_NAME and len(calls) == 1


def test_an_unreachable_archive_is_an_error_unless_optional(tmp_path, monkeypatch, capsys):
    """No index has bigbench==1.0.0: --bigbench fails (exit 2); with --bigbench_optional the local tasks are
    built, the BIG-bench ones are named as skipped, and nothing of them is written."""
    def unavailable(cache_dir=None):
        raise bb.BigBenchUnavailable("`pip download --no-deps bigbench==1.0.0` failed (exit 1): no package index")

    monkeypatch.setattr(bb, "fetch_bigbench", unavailable)
    text = tmp_path / "play.txt"
    text.write_text(play_text())
    out = tmp_path / "tasks"
    args = ["--text", str(text), "--bigbench", "--bigbench_tasks", "bb_social_iqa", "--out", str(out),
            "--max_examples", "5"]
    assert build_tasks.main(args) == 2
    assert "no package index" in capsys.readouterr().err and not out.exists()
    assert build_tasks.main(args + ["--bigbench_optional"]) == 0
    assert "warning: BIG-bench tasks skipped (bb_social_iqa)" in capsys.readouterr().err
    assert (out / "flex_ppl.yaml").is_file() and not list(out.glob("bb_*"))


def test_lm_eval_loads_and_scores_the_tasks(built, tmp_path):
    """lm-eval finds the tasks by tag, builds the requests BIG-bench-style, and reports acc with stderr."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class Scripted(LM):  # prefers the shortest continuation; records what it was asked
        requests: list = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.requests += [r.arguments for r in requests]
            return [(-float(len(cont)), False) for _, cont in (r.arguments for r in requests)]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    _, out = built
    manager = TaskManager(include_path=str(out), include_defaults=False)
    assert {"bb_social_iqa", "bb_winowhy", "bb_goal_step_wikihow", "bb_winogrande", bb.TAG} <= set(manager.all_tasks)
    lm = Scripted()
    results = simple_evaluate(model=lm, tasks=[bb.TAG], task_manager=manager, bootstrap_iters=10)
    contexts = {ctx for ctx, _ in lm.requests}
    assert "Please answer the following questions.\nReason 0.\nThe above reasoning is" in contexts
    assert (" matched." in {cont for _, cont in lm.requests}
            and any(ctx.endswith("since the shoes") for ctx in contexts))  # winogrande: the option in the context
    why = results["results"]["bb_winowhy"]
    assert why["acc,none"] == 0.5 and why["acc_stderr,none"] > 0  # " correct" always wins: right half the time
    winogrande = results["results"]["bb_winogrande"]
    assert "acc,none" in winogrande and "acc_norm,none" not in winogrande

    raw = tmp_path / "eval" / "raw" / "parent" / "0shot" / "m" / "results_2026-01-01T00-00-00.json"
    raw.parent.mkdir(parents=True)
    raw.write_text(json.dumps({k: results[k] for k in ("results", "configs", "config")}, default=str))
    task = collect.read_raw(tmp_path / "eval")["parent"]["tasks"]["bb_social_iqa"]
    assert task["main_metric"] == "acc_norm" and task["stderr"]["acc_norm"] == results["results"]["bb_social_iqa"][
        "acc_norm_stderr,none"]


def test_plan_local_includes_the_kept_bigbench_tasks(tmp_path):
    (tmp_path / "flex_hellaswag.yaml").write_text("task: flex_hellaswag\n")
    assert plan.local_tasks(tmp_path) == plan.LOCAL_TASKS  # no BIG-bench tasks built: unchanged
    kept = bb.DEFAULT_TASKS[:2]
    for name in (*kept, "bb_not_a_default"):
        (tmp_path / f"{name}.yaml").write_text(f"task: {name}\n")
    assert plan.local_tasks(tmp_path) == ",".join(["flex_hellaswag:0", *(f"{n}:0" for n in kept)])
    (tmp_path / "flex_hellaswag.yaml").unlink()
    assert plan.local_tasks(tmp_path) == ",".join(f"{n}:0" for n in kept)  # BIG-bench only


def test_plan_runs_bigbench_tasks_from_the_task_folder(built, tmp_path, monkeypatch):
    """The default --local plan of a folder with BIG-bench tasks runs them (offline: all tasks are local)."""
    _, out = built
    monkeypatch.setattr(bb, "DEFAULT_TASKS", ("bb_social_iqa", "bb_winowhy"))
    groups, offline = plan.check_tasks(plan.parse_tasks(plan.local_tasks(out), 0), out)
    assert groups == {0: ["bb_social_iqa", "bb_winowhy"]} and offline
