"""Nothing lost, nothing silently wrong: damaged or mismatched inputs give a clear error, never a wrong result."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from test_model import elastic
from transformers import AutoModelForCausalLM

from modeling_llamaflex import LlamaFlexForCausalLM, parse_budget
from modeling_llamaflex.elastic import Policy
from modeling_llamaflex.export import SafetensorsReader, safetensors_files


@pytest.fixture
def saved(llama, tmp_path):
    flex = elastic(llama)
    flex.save_pretrained(tmp_path / "flex")
    return flex, tmp_path / "flex"


# ---- 1. a damaged sharded checkpoint ----


def _truncate(file, fraction=0.5):
    with open(file, "r+b") as fh:
        fh.truncate(int(os.path.getsize(file) * fraction))


@pytest.mark.parametrize("holding", ["model.modulation.axes.depth.net.2.weight", "model.layers.3.mlp.down_proj.weight"])
def test_truncated_shard_refused_at_a_budget(llama, tmp_path, holding):
    flex = elastic(llama)
    flex.save_pretrained(tmp_path / "flex", max_shard_size="20KB")
    index = json.loads((tmp_path / "flex" / "model.safetensors.index.json").read_text())
    shard = tmp_path / "flex" / index["weight_map"][holding]
    _truncate(shard)
    with pytest.raises(OSError, match=rf"{shard.name} is truncated"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "flex", trust_remote_code=True, budget=0.5)
    with pytest.raises(OSError, match=rf"{shard.name} is truncated"):
        LlamaFlexForCausalLM.from_pretrained(tmp_path / "flex", budget=0.5)


def test_file_shortened_after_its_header_was_read(saved):
    """The reader checks how many bytes every read returned: it never keeps an earlier read's bytes."""
    _, path = saved
    reader = SafetensorsReader(safetensors_files(path))
    name = "model.layers.0.mlp.up_proj.weight"
    reader(name, None, None)  # header read, buffer filled
    file, start, entry = reader._entry(name)
    with open(file, "r+b") as fh:
        fh.truncate(start + entry["data_offsets"][0] + 100)  # inside the tensor
    with pytest.raises(OSError, match="ended inside tensor model.layers.0.mlp.up_proj.weight"):
        reader(name, None, None)


def test_damaged_shard_header_refused(llama, tmp_path):
    elastic(llama).save_pretrained(tmp_path / "flex", max_shard_size="20KB")
    index = json.loads((tmp_path / "flex" / "model.safetensors.index.json").read_text())
    shard = tmp_path / "flex" / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    with open(shard, "r+b") as fh:
        fh.write((10**9).to_bytes(8, "little"))  # a header length beyond the file
    with pytest.raises(OSError, match=rf"{shard.name} is not a readable safetensors file"):
        LlamaFlexForCausalLM.from_pretrained(tmp_path / "flex", budget=0.5)


# ---- 4. missing modulation weights ----


def test_missing_modulation_weights_refused_at_a_budget(saved):
    _, path = saved
    weights = load_file(path / "model.safetensors")
    gone = "model.modulation.axes.mlp.net.2.weight"
    save_file({k: v for k, v in weights.items() if k != gone}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing {gone}\b"):
        LlamaFlexForCausalLM.from_pretrained(path, budget=0.5)


# ---- 5. a budget on a folder holding one sub-model ----


def test_other_budget_on_a_sub_model_folder_refused(saved, input_ids, tmp_path):
    _, path = saved
    sub = LlamaFlexForCausalLM.from_pretrained(path, budget=0.5)
    sub.save_pretrained(tmp_path / "sub")
    for load in (AutoModelForCausalLM.from_pretrained, LlamaFlexForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"holds one sub-model only, that of budget 0\.5 .* at budget 0\.75"):
            load(tmp_path / "sub", budget=0.75)
        again = load(tmp_path / "sub", budget=0.5)  # its own budget, or none, load as before
        torch.testing.assert_close(again(input_ids).logits, sub(input_ids).logits)
        assert load(tmp_path / "sub").config.budget == 0.5


# ---- 7. concurrent forwards at different budgets ----


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_concurrent_forwards_at_different_budgets(llama, input_ids, attn):
    import threading

    flex = elastic(llama)
    flex.config._attn_implementation = attn
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0  # left padding: the attention functions take the masked (repeat_kv) path
    # two sub-models (about budgets 0.5 and 0.875) with different GQA ratios: 4 and 8 query heads on 2 KV heads
    policies = {
        0.5: Policy.one_hot(flex.config, {"hidden": 2, "heads": 0, "mlp": 3, "depth": 1}),
        0.875: Policy.one_hot(flex.config, {"hidden": 3, "heads": 1, "mlp": 6, "depth": 2}),
    }
    budgets = tuple(policies)
    with torch.no_grad():
        expected = {b: flex(input_ids, attention_mask=mask, policy=policies[b]).logits for b in budgets}
    results, errors = {b: [] for b in budgets}, []
    start = threading.Barrier(len(budgets))

    def work(b):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(50):
                    results[b].append(flex(input_ids, attention_mask=mask, policy=policies[b]).logits)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(b,)) for b in budgets]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: a race shows up on every run, not now and then
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for b in budgets:
        assert len(results[b]) == 50
        for logits in results[b]:
            torch.testing.assert_close(logits, expected[b], atol=0, rtol=0)


# ---- 8. odd budgets ----


def test_tiny_budget_with_trained_routers_is_a_clear_error(llama):
    flex = elastic(llama)
    flex.model.router.trained_steps.fill_(1)  # trained routers: their pick is checked against the target size
    with pytest.raises(ValueError, match=r"budget 1e-09 cannot be reached: .* allowed budgets are \[0\.\d+, 1\]"):
        flex.architecture(1e-9)


@pytest.mark.parametrize("text, number", [("0.5", 0.5), (" 0.75 ", 0.75), ("1", 1.0), ("1e-1", 0.1)])
def test_budget_strings_that_are_numbers_are_fractions(text, number):
    assert parse_budget(text, 10_000) == parse_budget(number, 10_000) == number


@pytest.mark.parametrize("budget", ["1.5", 1.5, "500", 500])
def test_budget_above_one_without_a_unit_is_refused(budget):
    with pytest.raises(ValueError, match=rf"budget {budget!r} is outside \(0, 1\]: .* give a unit, such as '5K'"):
        parse_budget(budget, 10_000)


def test_size_larger_than_the_parent_repeats_it(saved, input_ids):
    flex, path = saved
    message = r"budget '3B' asks for 3,000,000,000 parameters, more than the parent's [\d,]+ non-embedding"
    with pytest.raises(ValueError, match=message):
        flex.architecture("3B")
    with pytest.raises(ValueError, match=message):
        flex(input_ids, budget="3B")
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(path, budget="3B")


# ---- 2. training into a used output folder ----


class _PastTheCheck(Exception):
    pass


@pytest.fixture
def run_module(monkeypatch):
    """training/run.py whose tokenizer loading stops the run: a run that gets past the output_dir check ends there."""
    from training import run

    def stop(*args, **kwargs):
        raise _PastTheCheck

    monkeypatch.setattr(run.AutoTokenizer, "from_pretrained", stop)
    return run


def _run_argv(out, *extra):
    return ["--tokenizer", "tok", "--output_dir", str(out), "--report_to", "none", "--use_cpu", "true", *extra]


@pytest.mark.parametrize("marker", ["training_summary.json", "config.json", "model.safetensors"])
def test_run_py_refuses_an_output_dir_holding_a_finished_run(run_module, tmp_path, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    with pytest.raises(ValueError, match=rf"output_dir {out} already holds a run \({marker}\).*--overwrite_output_dir"):
        run_module.main(_run_argv(out))
    assert sorted(os.listdir(out)) == [marker]  # nothing touched
    for allowed in (["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", str(out / "checkpoint-2")]):
        with pytest.raises(_PastTheCheck):
            run_module.main(_run_argv(out, *allowed))


def test_run_py_accepts_a_new_folder_or_one_with_only_a_conversion(run_module, tmp_path):
    out = tmp_path / "out"
    (out / "converted").mkdir(parents=True)
    assert run_module.earlier_run(str(out)) == [] and run_module.earlier_run(str(tmp_path / "new")) == []
    for folder in (out, tmp_path / "new"):
        with pytest.raises(_PastTheCheck):
            run_module.main(_run_argv(folder))


# ---- 3. a stale output_dir/converted ----


def _convert(tmp_path, parent, resume=None, **model_options):
    from datasets import Dataset

    from training.arguments import FlexTrainingArguments
    from training.run import ModelArguments, prepare_model

    options = dict(parent=str(parent), calibration_samples=4, score_samples=0, elastic='{"budgets": [0.5, 0.75]}')
    options.update(model_options)
    args = FlexTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                                 resume_from_checkpoint=resume)
    torch.manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(3, 128, (8, 16)).tolist()})
    flex, flex_path, _ = prepare_model(ModelArguments(**options), args, None, data)
    return flex, flex_path


def test_converted_folder_is_reused_only_with_the_same_settings(tmp_path):
    for seed in (0, 1):
        tiny_llama(seed).save_pretrained(tmp_path / f"parent{seed}")
    flex, path = _convert(tmp_path, tmp_path / "parent0")
    recorded = json.loads((tmp_path / "out" / "converted" / "conversion.json").read_text())
    assert recorded["parent"] == str(tmp_path / "parent0") and recorded["elastic"] == {"budgets": [0.5, 0.75]}
    (tmp_path / "out" / "converted" / "sentinel").write_text("")  # gone when the folder is reconverted

    _convert(tmp_path, tmp_path / "parent0")  # the same settings: reused
    assert (tmp_path / "out" / "converted" / "sentinel").exists()

    flex, _ = _convert(tmp_path, tmp_path / "parent0", elastic='{"budgets": [0.6]}')
    assert flex.config.budgets == [0.6] and not (tmp_path / "out" / "converted" / "sentinel").exists()

    flex, _ = _convert(tmp_path, tmp_path / "parent1", elastic='{"budgets": [0.6]}')
    def entries(weight):  # unchanged by the channel permutations of conversion
        return weight.detach().flatten().sort().values

    assert torch.equal(entries(flex.model.embed_tokens.weight), entries(tiny_llama(1).model.embed_tokens.weight))

    with pytest.raises(ValueError, match=r"converted with other settings \(calibration_samples: 4 then, 2 now\).*resume"):
        _convert(tmp_path, tmp_path / "parent1", resume=str(tmp_path / "out" / "checkpoint-2"),
                 elastic='{"budgets": [0.6]}', calibration_samples=2)


def test_converted_folder_without_settings_is_reconverted(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "parent")
    _convert(tmp_path, tmp_path / "parent")
    os.remove(tmp_path / "out" / "converted" / "conversion.json")  # as a conversion by an earlier version left it
    (tmp_path / "out" / "converted" / "sentinel").write_text("")
    _convert(tmp_path, tmp_path / "parent")
    assert (tmp_path / "out" / "converted" / "conversion.json").exists()
    assert not (tmp_path / "out" / "converted" / "sentinel").exists()
