"""Elastic training of a LlamaFlex model, from a CPU toy to Llama 3.1 8B under DeepSpeed ZeRO-3.

    python training/run.py training/configs/cpu.yaml                                   # one process
    deepspeed --num_gpus 8 training/run.py training/configs/llama31_8b.yaml            # GPUs, ZeRO-3
    deepspeed --num_gpus 2 training/run.py training/configs/cpu.yaml --deepspeed training/configs/zero3_cpu.json --output_dir runs/flex-zero3

A config file (YAML or JSON) comes first (a launcher's own flags, e.g. deepspeed's `--local_rank=N`, may precede
it); any `--flag value` given overrides it. Steps:

1. `--parent`: a plain Llama is converted on the main process (importance ranking on `calibration_samples`
   training blocks) and saved to `<output_dir>/converted`, with the settings it was made with (`conversion.json`:
   parent, elastic options, importance and scoring); a later run reuses it only with the same settings, and
   reconverts otherwise. A LlamaFlex checkpoint is used as is; none at all gives a tiny random Llama (smoke tests).
   The parent also serves as the frozen distillation teacher. An output_dir holding a finished run is refused
   unless `--overwrite_output_dir` or `--resume_from_checkpoint` is given.
2. `FlexTrainer` trains weights, routers and modulation; `--resume_from_checkpoint` continues a run. With
   `--lora_r 16` (and `--lora_target_modules ...`) the weights stay frozen and LoRA adapters train instead,
   sliced with the weights at every budget (modeling_llamaflex/lora.py).
3. The LlamaFlex checkpoint (with auto_map; with LoRA, the adapter merged in, and the adapter itself in
   `<output_dir>/adapter`) goes to `output_dir`, the plain-Llama sub-models of the trained budgets to
   `<output_dir>/sub-models/budget-<b>`, and a summary to `<output_dir>/training_summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
import yaml
from transformers import AutoTokenizer, HfArgumentParser, LlamaConfig, LlamaForCausalLM, set_seed

from modeling_llamaflex import LlamaFlexForCausalLM
from modeling_llamaflex.parents import load_parent_model, load_parent_tokenizer, parent_model_type, resolve_parent
from training.arguments import FlexTrainingArguments
from training.data import DataArguments, build_lm_datasets, lm_data_collator
from training.trainer import FlexTrainer, budget_key, sorted_buckets

logger = logging.getLogger("training.run")


@dataclass
class ModelArguments:
    parent: str | None = field(
        default=None,
        metadata={"help": "A Llama checkpoint folder, a Llama .gguf file or the built-in name smollm2-135m (converted "
                          "here), or a LlamaFlex checkpoint. None: a tiny random Llama."},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder (default: the parent's)."})
    teacher: str | None = field(
        default=None, metadata={"help": "Distillation teacher (default: the parent, or the LlamaFlex model's own parent)."}
    )
    elastic: str | None = field(
        default=None,
        metadata={"help": 'LlamaFlexConfig overrides as JSON, e.g. \'{"budgets": [0.5, 0.75], "use_modulation": false}\'.'},
    )
    calibration_samples: int = field(default=256, metadata={"help": "Training blocks used to rank units (0: keep the order)."})
    importance: str | None = field(
        default=None,
        metadata={"help": 'Importance scorer: one name for every axis that has it, or JSON {"heads": "taylor", ...} '
                          "(modeling_llamaflex.importance.SCORERS; default: the library's)."},
    )
    score_samples: int = field(
        default=8, metadata={"help": "Training blocks (after the calibration ones) the candidate architectures are "
                                     "scored on, by KL to the parent (0: no quality ranking)."},
    )
    top_k: int = field(default=8, metadata={"help": "Candidates scored per budget (ranked by predicted KL)."})
    dtype: str = field(default="float32", metadata={"help": "Dtype of the loaded weights (bfloat16 on GPUs)."})
    extract_budgets: bool = field(default=True, metadata={"help": "Save the trained budgets' sub-models after training."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate every budget on the first N validation blocks only (None: all)."}
    )


def config_to_argv(path: str) -> list[str]:
    """A YAML/JSON config as command-line flags, so flags given after it override it."""
    with open(path) as fh:
        values = yaml.safe_load(fh) if path.endswith((".yaml", ".yml")) else json.load(fh)
    argv = []
    for key, value in (values or {}).items():
        if isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def cpu_deepspeed_setup(argv: list[str]) -> list[str]:
    """DeepSpeed without CUDA: gloo state before TrainingArguments, and use that state."""
    if "--deepspeed" not in argv or torch.cuda.is_available():
        return argv
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}.items():
        os.environ.setdefault(key, value)
    from accelerate import PartialState

    PartialState(backend="gloo")
    return argv + ["--accelerator_config", json.dumps({"use_configured_state": True})]


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def expand_config(argv: list[str]) -> list[str]:
    """The config file's flags, then every other argument in its order (so they override it).

    The config file is the first argument with a config suffix that is not a flag's value: launchers put
    their own flags before the script's (`deepspeed` inserts `--local_rank=N`, kept), and `--deepspeed ds.json`
    is a flag with its value, not the config.
    """
    for i, arg in enumerate(argv):
        if arg.startswith("-") or not arg.endswith(CONFIG_SUFFIXES):
            continue
        previous = argv[i - 1] if i else ""
        if not previous.startswith("-") or "=" in previous:
            return config_to_argv(arg) + argv[:i] + argv[i + 1 :]
    return list(argv)


def parse(argv: list[str] | None = None):
    argv = expand_config(list(sys.argv[1:] if argv is None else argv))
    argv = cpu_deepspeed_setup(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, FlexTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def tiny_parent(vocab_size: int, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    logger.warning("no --parent: using a tiny random Llama (%s); give --parent for real training", config.hidden_size)
    return LlamaForCausalLM(config)


def without_zero3(function, *args, **kwargs):
    """Run `function` with transformers' ZeRO-3 init switched off (the parent is loaded whole to convert it)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed.deepspeed_config() and hf_deepspeed._hf_deepspeed_config_weak_ref()
    if config is None:
        return function(*args, **kwargs)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        return function(*args, **kwargs)
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


CONVERSION_FILE = "conversion.json"  # in <output_dir>/converted: the settings it was converted with


def conversion_settings(model_args: ModelArguments, source) -> dict:
    """What a conversion depends on: the parent, the elastic options, the importance and scoring settings."""
    importance = model_args.importance
    if importance and importance.lstrip().startswith("{"):
        importance = json.loads(importance)
    settings = {
        "parent": os.path.abspath(source.file) if source is not None and os.path.exists(source.file) else (
            str(source) if source is not None else None),  # None: a tiny random Llama
        "elastic": json.loads(model_args.elastic) if model_args.elastic else {},
        "calibration_samples": model_args.calibration_samples,
        "importance": importance,
        "score_samples": model_args.score_samples,
        "top_k": model_args.top_k if model_args.score_samples else 0,
    }
    return json.loads(json.dumps(settings))  # as it reads back from the file


def stale_conversion(flex_path: str, settings: dict) -> str:
    """'' when `flex_path` holds no conversion or one made with `settings`; else what differs, in words."""
    if not os.path.exists(os.path.join(flex_path, "config.json")):
        return ""
    try:
        with open(os.path.join(flex_path, CONVERSION_FILE)) as fh:
            recorded = json.load(fh)
    except (OSError, ValueError):
        return f"it records no settings ({CONVERSION_FILE} missing or unreadable)"
    return "; ".join(f"{key}: {recorded.get(key)!r} then, {value!r} now"
                     for key, value in settings.items() if recorded.get(key) != value)


def prepare_model(model_args: ModelArguments, training_args, tokenizer, train_dataset):
    """Convert (main process only) or load the LlamaFlex model; returns (flex, teacher path or model)."""
    dtype = getattr(torch, model_args.dtype)
    parent_path = model_args.parent  # a folder, a .gguf file or a built-in name such as smollm2-135m
    source = resolve_parent(parent_path) if parent_path else None
    is_flex = source is not None and parent_model_type(source) == "llamaflex"
    if is_flex:
        flex_path = parent_path
    else:
        flex_path = os.path.join(training_args.output_dir, "converted")
        settings = conversion_settings(model_args, source)
        stale = stale_conversion(flex_path, settings)
        if stale and training_args.resume_from_checkpoint:
            raise ValueError(
                f"{flex_path} was converted with other settings ({stale}), so the checkpoint to resume from belongs to "
                "that conversion: resume with the settings it was converted with, or start a new run without "
                "--resume_from_checkpoint (that reconverts)"
            )
        with training_args.main_process_first(desc="converting the parent"):
            if training_args.process_index == 0 and (stale or not os.path.exists(os.path.join(flex_path, "config.json"))):
                if stale:
                    logger.warning("%s was converted with other settings (%s): reconverting", flex_path, stale)
                    shutil.rmtree(flex_path)
                parent = (
                    without_zero3(load_parent_model, source, dtype=torch.float32)
                    if source is not None else tiny_parent(len(tokenizer), tokenizer)
                )
                n = min(model_args.calibration_samples, len(train_dataset)) if hasattr(train_dataset, "__len__") else 0
                calibration = torch.tensor(train_dataset[:n]["input_ids"]) if n > 0 else None
                k = min(model_args.score_samples, len(train_dataset) - n) if n > 0 else 0
                scoring = torch.tensor(train_dataset[n : n + k]["input_ids"]) if k > 0 else calibration
                elastic = json.loads(model_args.elastic) if model_args.elastic else {}
                importance = model_args.importance
                if importance and importance.lstrip().startswith("{"):
                    importance = json.loads(importance)
                flex = without_zero3(LlamaFlexForCausalLM.from_llama, parent, calibration, importance=importance,
                                     score_data=scoring, top_k=model_args.top_k if model_args.score_samples else 0,
                                     **elastic)
                flex.save_pretrained(flex_path)
                with open(os.path.join(flex_path, CONVERSION_FILE), "w") as fh:
                    json.dump(settings, fh, indent=2)
                if parent_path is None:
                    parent.save_pretrained(os.path.join(training_args.output_dir, "parent"))
                logger.info("converted parent saved to %s; choices %s", flex_path, flex.config.choices)
                if flex.config.architecture_scores:
                    from modeling_llamaflex.search import format_scores

                    logger.info("one-shot architectures by measured quality:\n%s", format_scores(flex.config))
                del flex
    flex = LlamaFlexForCausalLM.from_pretrained(flex_path, dtype=dtype)
    teacher = model_args.teacher or parent_path or os.path.join(training_args.output_dir, "parent")
    return flex, flex_path, teacher


def earlier_run(output_dir: str) -> list[str]:
    """What `output_dir` holds of a finished run (its model, sub-models, summary) that training into it would replace.

    A folder with only `converted/`, `parent/` or the checkpoints of an interrupted run is not a finished run.
    """
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    return [n for n in names if n in ("training_summary.json", "config.json", "sub-models", "adapter")
            or n.startswith(("model.safetensors", "model-", "pytorch_model"))]


def check_output_dir(training_args) -> None:
    """Refuse to train over an earlier run unless told to (--overwrite_output_dir) or resuming it."""
    if training_args.overwrite_output_dir or training_args.resume_from_checkpoint:
        return
    found = earlier_run(training_args.output_dir)
    if found:
        raise ValueError(
            f"output_dir {training_args.output_dir} already holds a run ({', '.join(found)}): training into it would "
            "replace its model, sub-models and summary and rotate its checkpoints away. Give another --output_dir, "
            "--resume_from_checkpoint to continue that run, or --overwrite_output_dir to replace it"
        )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse(argv)
    check_output_dir(training_args)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(training_args.seed)
    if model_args.tokenizer is None and model_args.parent is None:
        raise ValueError("give --tokenizer (or a --parent with its tokenizer): the data must be tokenized")
    if model_args.parent:  # fetch a built-in parent once (one process), before every rank reads it
        with training_args.main_process_first(desc="fetching the parent"):
            resolve_parent(model_args.parent)
    tokenizer = (AutoTokenizer.from_pretrained(model_args.tokenizer) if model_args.tokenizer
                 else load_parent_tokenizer(model_args.parent))  # a .gguf parent's tokenizer comes from the file
    with training_args.main_process_first(desc="tokenizing"):
        datasets = build_lm_datasets(data_args, tokenizer)

    eval_dataset = datasets.get("validation")
    if eval_dataset is not None and model_args.max_eval_samples and not data_args.streaming:
        eval_dataset = eval_dataset.select(range(min(model_args.max_eval_samples, len(eval_dataset))))
    flex, flex_path, teacher_path = prepare_model(model_args, training_args, tokenizer, datasets["train"])
    teacher = None
    if training_args.distillation_weight > 0:
        if parent_model_type(teacher_path) != "llama":
            raise ValueError(f"the distillation teacher {teacher_path} must be a plain Llama; give --teacher")
        teacher = load_parent_model(teacher_path, dtype=getattr(torch, model_args.dtype))  # folder, .gguf or name
    trainer = FlexTrainer(
        model=flex,
        args=training_args,
        teacher_model=teacher,
        train_dataset=datasets["train"],
        eval_dataset=eval_dataset,
        data_collator=lm_data_collator(tokenizer),
        processing_class=tokenizer,
    )
    partitioned = [getattr(p, "ds_numel", None) is not None and p.numel() == 0 for p in flex.parameters()]
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_flex_model(training_args.output_dir)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    summary = {
        "train": result.metrics,
        "eval": metrics,
        "tokens_per_budget": {budget_key(b): n for b, n in sorted_buckets(trainer.tokens_per_budget)},
        "architectures": trainer.architecture_report(),
        "parent": model_args.parent,
        "parent_source": resolve_parent(model_args.parent).to_dict() if model_args.parent else None,
        "lora_r": training_args.lora_r,
        "converted_from": flex_path,
        "world_size": training_args.world_size,
        "zero3_partitioned": bool(partitioned) and all(partitioned),
    }
    if training_args.world_size > 1:  # each rank's draws, to check that all ranks ran the same architectures
        os.makedirs(os.path.join(training_args.output_dir, "logs"), exist_ok=True)
        with open(os.path.join(training_args.output_dir, "logs", f"samples-rank{training_args.process_index}.json"), "w") as fh:
            json.dump(trainer.sample_log, fh)
    if trainer.is_world_process_zero():
        if model_args.extract_budgets:
            summary["sub_models"] = save_sub_models(training_args.output_dir, tokenizer, trainer.budgets)
        path = os.path.join(training_args.output_dir, "training_summary.json")
        with open(path + ".tmp", "w") as fh:  # atomic: a crash never leaves half a summary
            json.dump(summary, fh, indent=2)
        os.replace(path + ".tmp", path)
        logger.info("saved LlamaFlex model, sub-models and training_summary.json to %s", training_args.output_dir)
    return summary


def save_sub_models(output_dir: str, tokenizer, budgets: list[float] | None = None) -> dict[str, dict]:
    """Extract the trained budgets (default: the config's) from the saved checkpoint as plain Llama folders."""
    flex = without_zero3(LlamaFlexForCausalLM.from_pretrained, output_dir, dtype=torch.float32)  # main process only
    saved = {}
    for budget in budgets or flex.config.budgets:
        arch = flex.architecture(budget)
        path = os.path.join(output_dir, "sub-models", f"budget-{budget:g}")
        flex.extract(arch).save_pretrained(path)
        tokenizer.save_pretrained(path)
        saved[f"{budget:g}"] = {"path": path, **arch.to_dict()}
        logger.info("budget %g -> %s: %s", budget, path, arch)
    return saved


if __name__ == "__main__":
    main()
