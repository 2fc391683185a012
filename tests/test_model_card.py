"""The model card: metadata and model-index from results.json, body from the template, offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_eval import fake_output, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT / "model_card"))

import collect  # noqa: E402
import generate  # noqa: E402


def check_card(model_dir: Path, results_path: Path, out: Path, *extra: str, license: str = "apache-2.0") -> ModelCard:
    """Generate the card, load it back with huggingface_hub and check its model-index against results.json."""
    assert generate.main([str(model_dir), "--results", str(results_path), "--out", str(out), *extra]) == 0
    card = ModelCard.load(out)
    results = json.loads(results_path.read_text())
    data = card.data
    assert data.license == license and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and {"llamaflex", "elastic", "llama"} <= set(data.tags)
    expected = {(row["label"], task): value for row in results["sub_models"]
                for task, value in row["metrics"].items() if value is not None}
    got = {}
    for result in data.eval_results:
        task = result.dataset_name.split(" (")[0]
        assert result.metric_type == results["tasks"][task]["metric"]
        assert result.dataset_args == {"num_few_shot": results["tasks"][task]["shots"]}
        got[(result.metric_config, task)] = result.metric_value
    assert got == pytest.approx(expected)
    assert "| budget | kind |" in card.text and "trust_remote_code=True, budget=0.5" in card.text
    if (results_path.parent / "accuracy_vs_params.png").exists():
        assert "](accuracy_vs_params.png)" in card.text and (out.parent / "accuracy_vs_params.png").is_file()
    return card


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model_dir, parent_dir, _ = make_checkpoint(root)
    out = model_dir / "eval"
    fake_output(out, model_dir, parent_dir)
    assert collect.main([str(out), str(model_dir)]) == 0
    return model_dir, out / "results.json"


def test_card_parses_and_matches_results(evaluated, tmp_path):
    model_dir, results = evaluated
    card = check_card(model_dir, results, tmp_path / "README.md", "--base_model", "org/parent", "--license", "mit",
                      license="mit")
    assert card.data.base_model == "org/parent" and card.data.license == "mit"
    configs = {r.metric_config for r in card.data.eval_results}
    assert configs == {"budget_0.375", "budget_0.5", "budget_0.625", "budget_1", "parent"}
    names = {r.metric_name for r in card.data.eval_results}
    assert "acc (budget 0.5, explicit)" in names and "acc (budget 0.375, interpolated)" in names
    assert "## Training" not in card.text  # no training_summary.json


def test_card_default_location_and_training_figures(evaluated):
    model_dir, results = evaluated
    summary = {
        "train": {"train_loss": 3.21, "train_runtime": 12.5, "total_flos": 1e9},
        "eval": {"eval_b1_loss": 3.1, "eval_b0.5_loss": 3.5},
        "tokens_per_budget": {"0.5": 1024, "1": 2048},
        "architectures": ["step 6 budget 0.5: hidden=48 heads=8 mlp=112 depth=3"],
        "sub_models": {},
        "parent": "/some/local/parent",
    }
    (model_dir / "training_summary.json").write_text(json.dumps(summary))
    try:
        card = check_card(model_dir, results, model_dir / "README.md")
    finally:
        (model_dir / "training_summary.json").unlink()
    assert card.data.base_model is None  # a local path is no hub id: named in the body only
    assert "`/some/local/parent`" in card.text
    assert "| 0.5 | 1,024 | 3.5 |" in card.text and "| train_loss | 3.21 |" in card.text
    assert "step 6 budget 0.5" in card.text


def test_card_refuses_missing_results(evaluated, tmp_path, capsys):
    model_dir, _ = evaluated
    assert generate.main([str(model_dir), "--results", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
