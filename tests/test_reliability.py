"""Nothing lost, nothing silently wrong: damaged or mismatched inputs give a clear error, never a wrong result."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import CONFIG_ERRORS, elastic, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modeling_llamaflex import LlamaFlexForCausalLM, parse_budget
from modeling_llamaflex.elastic import Policy
from modeling_llamaflex.safetensors_io import SafetensorsReader, safetensors_files


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


# ---- 6. stale eval results ----


def _finish(line: str, results: dict) -> None:
    """Do what a plan line does when lm-eval succeeds: results in its folder, then its fingerprint."""
    import subprocess

    cmd = line.split("\t", 1)[1]
    out_dir = cmd.split("--output_path ", 1)[1].split(" ", 1)[0]
    done = os.path.join(out_dir, "m", "results_2026-01-01T00-00-00.json")
    os.makedirs(os.path.dirname(done), exist_ok=True)
    with open(done, "w") as fh:
        json.dump({"results": results}, fh)
    subprocess.run(["bash", "-c", cmd.split(" && ", 1)[1]], check=True)


def test_eval_reruns_results_made_with_another_limit_checkpoint_or_task(tmp_path, capsys):
    import shutil

    from conftest import make_checkpoint

    from eval import build_tasks, plan

    model_dir, _, text = make_checkpoint(tmp_path / "ckpt")
    tasks = tmp_path / "tasks"
    assert build_tasks.main(["--text", str(text), "--out", str(tasks), "--max_examples", "6"]) == 0
    emit = tmp_path / "plan.txt"

    def planned(limit="3"):
        args = [str(model_dir), "--task_dir", str(tasks), "--output", str(tmp_path / "out"), "--emit", str(emit),
                "--tasks", "flex_lambada", "--budgets", "0.5", "--limit", limit]
        capsys.readouterr()
        assert plan.main(args) == 0
        return emit.read_text().splitlines(), capsys.readouterr().err

    lines, _ = planned()
    _finish(lines[0], {"flex_lambada": {"acc,none": 0.5}})
    lines, err = planned()
    assert lines == [] and "results exist" in err  # the same call: skipped

    lines, err = planned("4")  # another --limit
    assert len(lines) == 1 and "stale (made with another limit)" in err
    _finish(lines[0], {"flex_lambada": {"acc,none": 0.5}})
    assert planned("4")[0] == []

    weights = model_dir / "model.safetensors"  # the checkpoint re-saved (trained further)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    lines, err = planned("4")
    assert len(lines) == 1 and "stale (made with another checkpoint)" in err
    _finish(lines[0], {"flex_lambada": {"acc,none": 0.5}})

    yaml_file = tasks / "flex_lambada.yaml"  # the local task rebuilt differently
    yaml_file.write_text(yaml_file.read_text() + "\n# rebuilt\n")
    lines, err = planned("4")
    assert len(lines) == 1 and "stale (made with another tasks)" in err
    _finish(lines[0], {"flex_lambada": {"acc,none": 0.5}})
    data = next(p for p in tasks.rglob("*.jsonl") if "lambada" in p.name)  # its data file changed
    shutil.copy(data, tmp_path / "keep.jsonl")
    data.write_text(data.read_text().replace("a", "b", 1))
    lines, err = planned("4")
    assert len(lines) == 1 and "stale (made with another tasks)" in err

    (tmp_path / "out" / "raw" / "budget_0.5" / "0shot" / "fingerprint.json").unlink()  # an interrupted run's
    lines, err = planned("4")
    assert len(lines) == 1 and "stale (no fingerprint.json" in err


# ---- 9. config gaps ----


def _flex_config(**options):
    from conftest import tiny_llama_config

    from modeling_llamaflex import LlamaFlexConfig

    return LlamaFlexConfig.from_llama_config(tiny_llama_config(), **options)


def test_budget_strings_in_the_config_are_parsed():
    config = _flex_config(budgets=["0.75", "0.5", " 0.625 "])
    assert config.budgets == [0.5, 0.625, 0.75]
    size = config.parent_parameters() // 2
    assert _flex_config(budgets=[f"{size / 1000}K", 0.75]).budgets == [pytest.approx(size / config.parent_parameters()),
                                                                      0.75]
    with pytest.raises(ValueError, match=r"budgets\[1\]: budget '3B' asks for 3,000,000,000 parameters, more than"):
        _flex_config(budgets=["0.5", "3B"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"budgets": 0.5}, r"budgets must be a list of budgets .* got 0\.5 \(float\); for one budget, give \[0\.5\]"),
        ({"budgets": []}, r"budgets is empty: give at least one budget"),
        ({"budgets": [0.5, 0.75, 0.5]}, r"budgets \[0\.5, 0\.5, 0\.75\] hold \[0\.5\] more than once"),
        ({"budgets": [0.01, 0.5]}, r"budgets \[0\.01\] cannot be reached: .* allowed budgets are \[0\.\d+, 1\]"),
        ({"budgets": [True, 0.5]}, r"budgets\[0\] is True \(bool\)"),
        ({"depth_choices": [True, 4]}, r"depth_choices must be a non-empty list of positive integers .* \[True, 4\]"),
        ({"router_embed_dim": 7}, r"router_embed_dim must be even .* got 7"),
    ],
)
def test_config_gaps_are_refused_at_config_time(options, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        _flex_config(**options)


# ---- 10. smaller ones ----


def test_tokens_per_budget_survive_a_resume(tmp_path):
    import shutil

    from conftest import StopAt, arguments, dataset

    from training.trainer import FlexTrainer

    def run(out, stop=None, resume=None):
        torch.manual_seed(0)
        flex = LlamaFlexForCausalLM.from_llama(tiny_llama(), budgets=[0.5, 0.75])
        args = arguments(tmp_path, output_dir=str(tmp_path / out), max_steps=6, save_strategy="steps", save_steps=3,
                         logging_steps=3, distillation_weight=0, interpolated_budget_probability=0.5)
        trainer = FlexTrainer(model=flex, args=args, train_dataset=dataset())
        if stop is not None:
            trainer.add_callback(StopAt(stop))
        trainer.train(resume_from_checkpoint=resume)
        return dict(trainer.tokens_per_budget)

    full = run("uninterrupted")
    assert sum(full.values()) == 6 * 4 * 16  # every token of every step, counted once
    assert "interpolated" in full and len(full) > 1  # budgets between the trained ones are counted apart
    run("interrupted", stop=3)
    shutil.rmtree(tmp_path / "interrupted" / "checkpoint-6", ignore_errors=True)
    assert run("interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-3")) == full


def test_extract_checks_every_budget_before_writing(saved, tmp_path, capsys):
    from modeling_llamaflex.__main__ import main

    _, path = saved
    out = tmp_path / "subs"
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--model", str(path), "--budget", "0.5", "0.01", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "budget 0.01 cannot be reached" in capsys.readouterr().err and not out.exists()
    (out / "budget-0.75").mkdir(parents=True)
    (out / "budget-0.75" / "config.json").write_text("{}")  # a later budget's folder is taken
    with pytest.raises(SystemExit):
        main(["extract", "--model", str(path), "--budget", "0.5", "0.75", "--out", str(out)])
    assert "--overwrite" in capsys.readouterr().err and sorted(os.listdir(out)) == ["budget-0.75"]


def _rewrite(path, change):
    weights = load_file(path / "model.safetensors")
    change(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_at_a_budget_names_it_and_the_checkpoint(saved):
    flex, path = saved
    name = f"model.layers.{flex.architecture(0.5).kept_layers[0]}.mlp.up_proj.weight"
    _rewrite(path, lambda w: w.pop(name))
    with pytest.raises(ValueError, match=rf"checkpoint {path} is missing tensor\(s\) its config needs: {name}\b"):
        LlamaFlexForCausalLM.from_pretrained(path, budget=0.5)
    reader = SafetensorsReader(safetensors_files(path), source=path)
    with pytest.raises(ValueError, match=rf"checkpoint {path} has no tensor {name}:"):
        reader(name, None, None)


def test_wrong_shape_at_a_budget_names_the_tensor_and_the_checkpoint(saved):
    flex, path = saved
    name = f"model.layers.{flex.architecture(0.5).kept_layers[0]}.mlp.up_proj.weight"

    def shrink(weights):
        weights[name] = weights[name][:96].contiguous()  # 96 rows where the config has 128: slices still fit

    _rewrite(path, shrink)
    message = rf"checkpoint {path} holds tensor\(s\) of the wrong shape .*: {name} is \[96, 64\], the config needs \[128, 64\]"
    with pytest.raises(ValueError, match=message):
        LlamaFlexForCausalLM.from_pretrained(path, budget=0.5)


def test_wrong_router_weights_at_a_budget_name_the_checkpoint(saved):
    _, path = saved

    def shrink(weights):
        name = next(k for k in weights if k.startswith("model.router.") and k.endswith("weight"))
        weights[name] = weights[name][:1].contiguous()

    _rewrite(path, shrink)
    with pytest.raises(ValueError, match=rf"checkpoint {path}: its router weights \(model.router.\*\) do not fit .*size"):
        LlamaFlexForCausalLM.from_pretrained(path, budget=0.5)


# ---- strict loading, and the loading options an elastic checkpoint cannot take ----


def test_whole_model_loading_is_strict(saved):
    flex, path = saved
    model, info = LlamaFlexForCausalLM.from_pretrained(path, output_loading_info=True)  # asked for: returned
    assert not info["missing_keys"] and not info["unexpected_keys"]
    weights = load_file(path / "model.safetensors")
    gone = "model.modulation.axes.mlp.net.2.weight"  # not a router weight: transformers alone would only warn
    save_file({k: v for k, v in weights.items() if k != gone}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"does not fit its config.json: missing {gone}\b"):
        LlamaFlexForCausalLM.from_pretrained(path)
    extra = dict(weights, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    save_file(extra, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected model.layers.0.mlp.extra.weight"):
        LlamaFlexForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("option", [{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
                                    {"load_in_8bit": True}, {"tp_plan": "auto"}])
def test_quantised_or_tensor_parallel_loading_refused(saved, option):
    _, path = saved
    name = "tp_plan" if "tp_plan" in option else "quantised"
    for budget in (None, 0.5):
        with pytest.raises(ValueError, match=name):
            LlamaFlexForCausalLM.from_pretrained(path, budget=budget, **option)


def test_device_maps_at_a_budget(saved, input_ids):
    flex, path = saved
    for device_map in ("auto", {"model.layers.0": "cpu", "lm_head": "cpu"}):
        with pytest.raises(ValueError, match=r"device_map=.* is not supported when loading at a budget"):
            LlamaFlexForCausalLM.from_pretrained(path, budget=0.5, device_map=device_map)
    for device_map in ("cpu", {"": "cpu"}):  # one device (lm-eval passes {"": "cpu"})
        sub = LlamaFlexForCausalLM.from_pretrained(path, budget=0.5, device_map=device_map)
        torch.testing.assert_close(sub(input_ids).logits, flex(input_ids, budget=0.5).logits)
