"""The shipped training configs parse, and the Llama 3.1 8B recipe fits 8 x 80 GB under ZeRO-3 (DeepSpeed's estimator)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import yaml
from conftest import ROOT
from transformers import HfArgumentParser, LlamaConfig

from modeling_llamaflex import LlamaFlexConfig, LlamaFlexForCausalLM
from training.arguments import FlexTrainingArguments
from training.data import DataArguments
from training.run import ModelArguments, config_to_argv, expand_config

CONFIGS = os.path.join(ROOT, "training", "configs")


def parse(name: str, drop=("--deepspeed", "--bf16")):
    argv = config_to_argv(os.path.join(CONFIGS, name))
    for flag in drop:  # DeepSpeed and bf16 need their hardware to build TrainingArguments
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    return HfArgumentParser((ModelArguments, DataArguments, FlexTrainingArguments)).parse_args_into_dataclasses(args=argv)


def plain(value):
    """A parsed argument as the YAML wrote it: enums by value, JSON strings (e.g. `elastic`) decoded."""
    value = getattr(value, "value", value)
    if isinstance(value, str) and value[:1] in "{[":
        return json.loads(value)
    return value


@pytest.mark.parametrize("name", ["cpu.yaml", "cpu_smollm2.yaml", "llama31_8b.yaml"])
def test_every_key_of_a_shipped_config_reaches_its_argument(name):
    """No key of a config is dropped, renamed or changed on its way to the dataclasses training/run.py uses."""
    with open(os.path.join(CONFIGS, name)) as fh:
        written = yaml.safe_load(fh)
    parsed = {}
    for arguments in parse(name):
        parsed.update({f.name: getattr(arguments, f.name) for f in dataclasses.fields(arguments)})
    dropped = {"deepspeed", "bf16"}  # parse() drops them: they need their hardware
    for key, value in written.items():
        if key in dropped:
            continue
        assert key in parsed, f"{name}: {key!r} is no argument"
        got = plain(parsed[key])
        if key == "report_to":
            got, value = list(got), [value] if isinstance(value, str) else value
        assert got == value, (name, key, got, value)


def test_the_config_file_is_found_among_a_launchers_flags():
    cpu, ds = "training/configs/cpu.yaml", "training/configs/zero3_cpu.json"
    yaml_flags = config_to_argv(os.path.join(ROOT, cpu))
    # deepspeed puts --local_rank=N before the script's arguments; --deepspeed's value is not the config
    assert expand_config(["--local_rank=0", cpu, "--deepspeed", ds]) == yaml_flags + ["--local_rank=0", "--deepspeed", ds]
    assert expand_config([cpu, "--max_steps", "3"]) == yaml_flags + ["--max_steps", "3"]
    assert expand_config(["--deepspeed", ds, "--max_steps", "3"]) == ["--deepspeed", ds, "--max_steps", "3"]
    assert expand_config(["--lora_target_modules", "q_proj", "v_proj", cpu]) == yaml_flags + ["--lora_target_modules", "q_proj", "v_proj"]


def test_parse_under_the_deepspeed_launcher(tmp_path):
    """README's `deepspeed --num_gpus 2 training/run.py training/configs/cpu.yaml --deepspeed ...`: the argv one
    rank's run.py gets. In a subprocess: a DeepSpeed parse sets up process-wide state (gloo, the HF DeepSpeed config)."""
    pytest.importorskip("deepspeed")
    import socket
    import subprocess
    import sys

    script = (
        "import json; from training.run import parse\n"
        "m, d, t = parse(['--local_rank=0', 'training/configs/cpu.yaml', '--deepspeed', 'training/configs/zero3_cpu.json',"
        f" '--output_dir', {str(tmp_path / 'out')!r}])\n"
        "print(json.dumps({'parent': m.parent, 'block_size': d.block_size, 'max_steps': t.max_steps,"
        " 'router_learning_rate': t.router_learning_rate, 'deepspeed': t.deepspeed, 'local_rank': t.local_rank}))\n"
    )
    with socket.socket() as sock:  # a free port for the one-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_PORT=str(port))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    model, data, train = parse("cpu.yaml")
    assert got == {"parent": model.parent, "block_size": data.block_size, "max_steps": train.max_steps,
                   "router_learning_rate": train.router_learning_rate, "deepspeed": "training/configs/zero3_cpu.json",
                   "local_rank": 0}


def test_llama31_8b_recipe_is_the_papers():
    model, data, train = parse("llama31_8b.yaml")
    assert data.block_size == 4096 and data.streaming
    assert train.max_steps == 28800 and train.learning_rate == 4e-5 and train.lr_scheduler_type == "cosine"
    assert train.router_learning_rate == 4e-2 and train.modulation_learning_rate == 4e-2
    assert train.gumbel_temperature_decay == 0.9999 and (train.logit_scale_start, train.logit_scale_end) == (1.0, 10.0)
    assert train.per_device_train_batch_size * train.gradient_accumulation_steps * 8 == 128  # on 8 GPUs
    with open(os.path.join(CONFIGS, "zero3.json")) as fh:
        assert json.load(fh)["zero_optimization"]["stage"] == 3


def test_llama31_8b_fits_eight_80gb_gpus_under_zero3():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    with open(os.path.join(CONFIGS, "llama31_8b_parent.json")) as fh:
        parent = LlamaConfig(**{k: v for k, v in json.load(fh).items() if k != "model_type"})
    with torch.device("meta"):
        flex = LlamaFlexForCausalLM(LlamaFlexConfig.from_llama_config(parent))
    total = sum(p.numel() for p in flex.parameters())
    largest = max(p.numel() for p in flex.parameters())  # the embedding / LM head
    assert 8.0e9 < total < 8.1e9  # Llama 3.1 8B plus < 1M router and modulation parameters
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=8, num_nodes=1, cpu_offload=False, cpu_offload_params=False
    )
    teacher_bytes = 2 * total / 8  # the bf16 parent, partitioned by ZeRO-3 as well
    assert (gpu_bytes + teacher_bytes) / 2**30 < 40  # model states leave half of an 80 GB GPU for activations
