"""Saving and loading: Auto classes with and without remote code, loading at a budget, plain-Llama exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ATOL, elastic, non_embedding_parameters
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaForCausalLM

from modeling_llamaflex import LlamaFlexForCausalLM, LlamaFlexModel


@pytest.fixture
def saved(llama, tmp_path):
    flex = elastic(llama)
    path = tmp_path / "flex"
    flex.save_pretrained(path)
    return flex, path


def test_save_writes_auto_map_and_code(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llamaflex"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "modeling_llamaflex")
    for name in sorted(os.listdir(package)):  # every module of the package travels with the checkpoint
        if name.endswith(".py") and name not in ("__init__.py", "__main__.py"):
            assert (path / name).exists(), name


def test_round_trip_through_auto_classes(saved, input_ids):
    flex, path = saved
    assert isinstance(AutoConfig.from_pretrained(path), type(flex.config))
    full = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(full, LlamaFlexForCausalLM) and full.config.elastic
    torch.testing.assert_close(full(input_ids).logits, flex(input_ids).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(full(input_ids, budget=0.6).logits, flex(input_ids, budget=0.6).logits, atol=ATOL, rtol=0)

    sub = AutoModelForCausalLM.from_pretrained(path, budget=0.6)
    extracted = flex.extract(0.6)
    assert not sub.config.elastic and sub.model.router is None and sub.model.modulation is None
    # physically the sub-model's size
    assert sum(p.numel() for p in sub.parameters()) == sum(p.numel() for p in extracted.parameters())
    assert sub.config.hidden_size == flex.architecture(0.6).hidden
    torch.testing.assert_close(sub(input_ids).logits, extracted(input_ids).logits, atol=ATOL, rtol=0)
    prompt = input_ids[:1, :5]
    assert torch.equal(
        sub.generate(prompt, max_new_tokens=8, do_sample=False),
        extracted.generate(prompt, max_new_tokens=8, do_sample=False),
    )

    base = AutoModel.from_pretrained(path, budget=0.6)
    assert isinstance(base, LlamaFlexModel)
    expected = flex.model(input_ids, budget=0.6).last_hidden_state
    torch.testing.assert_close(base(input_ids).last_hidden_state, expected, atol=ATOL, rtol=0)
    direct = LlamaFlexForCausalLM.from_pretrained(path, budget=0.6)
    torch.testing.assert_close(direct(input_ids).logits, extracted(input_ids).logits, atol=ATOL, rtol=0)


def test_remote_code_in_a_clean_process(saved, input_ids, tmp_path):
    """trust_remote_code=True in a process that cannot import our package: only the checkpoint's code."""
    flex, path = saved
    torch.save(input_ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel, AutoModelForCausalLM
        assert "modeling_llamaflex" not in sys.modules
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        full = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
        sub = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True, budget=0.6)
        base = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True, budget=0.6)
        assert type(full).__module__.startswith("transformers_modules"), type(full).__module__
        torch.save({{"full": full(ids).logits, "sub": sub(ids).logits, "base": base(ids).last_hidden_state,
                    "sub_params": sum(p.numel() for p in sub.parameters())}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    extracted = flex.extract(0.6)
    torch.testing.assert_close(out["full"], flex(input_ids).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["sub"], extracted(input_ids).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["base"], flex.model(input_ids, budget=0.6).last_hidden_state, atol=ATOL, rtol=0)
    assert out["sub_params"] == sum(p.numel() for p in extracted.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_extracted_model_is_a_plain_llama_checkpoint(tied, input_ids, tmp_path):
    from conftest import tiny_llama

    flex = elastic(tiny_llama(tie_word_embeddings=tied))
    sub = flex.extract(0.5)
    sub.save_pretrained(tmp_path / "sub")
    assert not list((tmp_path / "sub").glob("*.py"))
    config = json.loads((tmp_path / "sub" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    assert type(loaded) is LlamaForCausalLM
    assert non_embedding_parameters(loaded) == flex.architecture(0.5).num_parameters
    torch.testing.assert_close(loaded(input_ids).logits, flex(input_ids, budget=0.5).logits, atol=ATOL, rtol=0)


def test_sub_model_loaded_at_a_budget_saves_and_reloads(saved, input_ids, tmp_path):
    flex, path = saved
    sub = LlamaFlexForCausalLM.from_pretrained(path, budget=0.6)
    sub.save_pretrained(tmp_path / "sub")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    assert not again.config.elastic
    torch.testing.assert_close(again(input_ids).logits, sub(input_ids).logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="holds one sub-model only"):
        again(input_ids, budget=0.8)


# ---- errors ----


def test_checkpoint_without_router_weights(saved, tmp_path):
    _, path = saved
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".router." not in k}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no router weights"):
        AutoModelForCausalLM.from_pretrained(path, budget=0.5)
    with pytest.raises(ValueError, match="no router weights"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    "budget, message",
    [
        (0.01, r"cannot be reached: .* allowed budgets are \[0\.\d+, 1\]"),
        (1.5, r"outside \(0, 1\]"),
        ("half", r"is not a number"),
        (-0.2, r"outside \(0, 1\]"),
    ],
)
def test_bad_budgets(saved, input_ids, budget, message):
    flex, path = saved
    with pytest.raises(ValueError, match=message):
        flex.architecture(budget)
    with pytest.raises(ValueError, match=message):
        flex(input_ids, budget=budget)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(path, budget=budget)


def test_non_numeric_budget_type(llama):
    flex = elastic(llama)
    with pytest.raises(TypeError, match="budget must be a number"):
        flex.architecture([0.5])


def test_model_loaded_at_a_budget_generates_with_the_kv_cache(llama, input_ids, tmp_path):
    """Trainer leaves config.use_cache=False in checkpoints; generation follows generation_config.json."""
    flex = elastic(llama)
    flex.config.use_cache = False
    flex.save_pretrained(tmp_path / "flex")
    sub = AutoModelForCausalLM.from_pretrained(tmp_path / "flex", budget=0.6)
    lengths = []
    hook = sub.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    sub.generate(input_ids[:1, :5], max_new_tokens=3, do_sample=False)
    hook.remove()
    assert lengths == [5, 1, 1]


def test_loading_at_a_budget_reads_bf16_and_sharded_checkpoints(llama, input_ids, tmp_path):
    flex = elastic(llama).to(torch.bfloat16)
    flex.save_pretrained(tmp_path / "flex", max_shard_size="100KB")  # several shards and an index
    assert (tmp_path / "flex" / "model.safetensors.index.json").exists()
    sub = AutoModelForCausalLM.from_pretrained(tmp_path / "flex", budget=0.6)
    extracted = flex.extract(0.6)
    assert sub.dtype == torch.bfloat16
    got, expected = dict(sub.named_parameters()), dict(extracted.named_parameters())
    assert got.keys() == expected.keys()
    for name, a in got.items():
        assert torch.equal(a, expected[name]), name
