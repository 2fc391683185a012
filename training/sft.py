"""Supervised fine-tuning of the whole family with TRL: `FlexSFTTrainer` and `FlexSFTConfig`.

    python training/sft.py training/configs/sft_cpu.yaml                      # LoRA on the CPU default
    python training/sft.py training/configs/sft_cpu.yaml --lora_r 0 --learning_rate 1e-4   # all weights

`FlexSFTTrainer` is TRL's `SFTTrainer` (chat templates, assistant-only or completion-only labels, packing,
PEFT) with `FlexTrainer`'s elastic training shared through `FlexTrainingMixin`: every micro-batch samples a
budget (the full model with `full_budget_probability`), routes it (soft/masked or hard/sliced), and the loss is
`lm_loss_weight` · the SFT loss (next-token cross-entropy on the label tokens) + `budget_loss_weight` · the
routers' budget loss (+ distillation from a `teacher_model` if `distillation_weight` > 0). So one run
fine-tunes every sub-model of the family at once. `FlexSFTConfig` is TRL's `SFTConfig` plus the same
`FlexArguments` fields as `FlexTrainingArguments` (`budgets`, sampling, losses, schedules, `lora_r`, ...).

With `lora_r` > 0 (or a `peft_config`) the base stays frozen: LoRA adapters, sliced with the weights at every
budget (`modeling_llamaflex/lora.py`), train with the routers and modulation. The output folder then holds a
plain LlamaFlex checkpoint with the adapter merged, and the adapter itself in `adapter/`; the trained
budgets are extracted as plain Llama folders in `sub-models/budget-<b>`.

Data: any `datasets` source with a `messages` column (`--train_file`/`--validation_file` JSON(L), or
`--dataset_name`). The CPU default builds a small Shakespeare question/answer set (`training/chat_data.py`).
A tokenizer without a chat template gets the simple one of `chat_data.CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoTokenizer, HfArgumentParser, LlamaForCausalLM, set_seed
from trl import SFTConfig, SFTTrainer

from modeling_llamaflex import LlamaFlexForCausalLM
from training.arguments import FlexArguments
from training.chat_data import CHAT_TEMPLATE, build_chat_data
from training.run import expand_config, save_sub_models
from training.trainer import FlexTrainingMixin, add_lora, budget_key, sorted_buckets

logger = logging.getLogger("training.sft")


@dataclass
class FlexSFTConfig(FlexArguments, SFTConfig):
    """TRL's `SFTConfig` + the elastic-training fields of `FlexArguments` (shared with `FlexTrainingArguments`).

    Defaults differ from elastic pretraining in the loss only: the SFT loss (`lm_loss_weight=1`), no teacher.
    """

    distillation_weight: float = field(
        default=0.0, metadata={"help": "Weight of the forward KL from a teacher's logits (needs teacher_model; 0: none)."}
    )
    lm_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the SFT loss (cross-entropy on the label tokens)."})


class FlexSFTTrainer(FlexTrainingMixin, SFTTrainer):
    """TRL's `SFTTrainer` training every budget of a LlamaFlex family (see the module docstring).

    `model`: a `LlamaFlexForCausalLM` (or its path), bare or with a PEFT adapter; `peft_config` (or
    `args.lora_r`) adds one. `teacher_model`: a frozen model to distil from when `distillation_weight` > 0.
    """

    args_class = FlexSFTConfig

    def __init__(self, model, args: FlexSFTConfig | None = None, teacher_model=None, peft_config=None, **kwargs):
        if isinstance(args, FlexSFTConfig):
            if args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split")):
                raise ValueError(
                    "padding-free batches (padding_free=True, or packing with packing_strategy 'bfd'/'bfd_split') are "
                    "not supported by LlamaFlex models: use packing_strategy='wrapped' or no packing"
                )
            if peft_config is not None and args.lora_r:
                raise ValueError(f"give either peft_config or lora_r (= {args.lora_r}), not both")
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {}) if isinstance(args, SFTConfig) else {}
            model = LlamaFlexForCausalLM.from_pretrained(model, **init_kwargs)
        if peft_config is not None:  # ours, not TRL's: add_lora registers the elastic LoRA layers (lora.py)
            model = add_lora(model, peft_config)
        super().__init__(model=model, args=args, teacher_model=teacher_model, **kwargs)


# ---- the script ----


@dataclass
class SFTScriptArguments:
    model: str | None = field(
        default=None, metadata={"help": "A LlamaFlex checkpoint (e.g. the output of training/run.py)."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder (default: the model's)."})
    teacher: str | None = field(default=None, metadata={"help": "A plain Llama to distil from (distillation_weight > 0)."})
    dtype: str = field(default="float32", metadata={"help": "Dtype of the loaded weights (bfloat16 on GPUs)."})
    train_file: str | None = field(default=None, metadata={"help": "Training conversations (JSON/JSONL with a messages column)."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation conversations (same format)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` source instead of the files."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    build_chat_data: bool = field(
        default=False,
        metadata={"help": "Build the Shakespeare chat set (training/chat_data.py) into train_file's folder if missing."},
    )
    corpus_dir: str = field(default=".cache/shakespeare", metadata={"help": "Corpus that build_chat_data reads."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N conversations only."})
    extract_budgets: bool = field(default=True, metadata={"help": "Save the trained budgets' sub-models after training."})


def parse(argv: list[str] | None = None) -> tuple[SFTScriptArguments, FlexSFTConfig]:
    argv = expand_config(list(sys.argv[1:] if argv is None else argv))
    return HfArgumentParser((SFTScriptArguments, FlexSFTConfig)).parse_args_into_dataclasses(args=argv)


def load_chat_datasets(script: SFTScriptArguments) -> dict:
    """{"train": ..., "validation": ...} with a `messages` column, from files or a `datasets` source."""
    if script.build_chat_data and script.train_file and not os.path.exists(script.train_file):
        paths = build_chat_data(script.corpus_dir, os.path.dirname(script.train_file) or ".")
        logger.info("built the Shakespeare chat set: %s", {k: str(v) for k, v in paths.items()})
    files = {k: v for k, v in (("train", script.train_file), ("validation", script.validation_file)) if v}
    if script.dataset_name:
        datasets = load_dataset(script.dataset_name, script.dataset_config_name, data_files=files or None)
    elif "train" in files:
        datasets = load_dataset("json", data_files=files)
    else:
        raise ValueError("give --train_file (JSON/JSONL conversations with a messages column) or --dataset_name")
    if "train" not in datasets:
        raise ValueError(f"the data has no train split (splits: {list(datasets)})")
    for split, dataset in datasets.items():
        if "messages" not in dataset.column_names:
            raise ValueError(
                f"the {split} split has no 'messages' column (columns: {dataset.column_names}); SFT here takes "
                "conversations: a list of {'role', 'content'} per row"
            )
    out = {"train": datasets["train"].select_columns(["messages"])}
    if "validation" in datasets:
        validation = datasets["validation"].select_columns(["messages"])
        if script.max_eval_samples:
            validation = validation.select(range(min(script.max_eval_samples, len(validation))))
        out["validation"] = validation
    return out


def main(argv: list[str] | None = None) -> dict:
    script, args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    if script.model is None:
        raise ValueError("give --model: a LlamaFlex checkpoint (train one with training/run.py)")
    tokenizer = AutoTokenizer.from_pretrained(script.tokenizer or script.model)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
        logger.info("the tokenizer has no chat template: using training/chat_data.py's CHAT_TEMPLATE")
    datasets = load_chat_datasets(script)
    flex = LlamaFlexForCausalLM.from_pretrained(script.model, dtype=getattr(torch, script.dtype))
    teacher = None
    if args.distillation_weight > 0:
        if script.teacher is None:
            raise ValueError("distillation_weight > 0 needs --teacher (a plain Llama checkpoint)")
        teacher = LlamaForCausalLM.from_pretrained(script.teacher, dtype=getattr(torch, script.dtype))
    trainer = FlexSFTTrainer(
        model=flex, args=args, teacher_model=teacher, train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"), processing_class=tokenizer,
    )
    before = trainer.evaluate() if "validation" in datasets else {}
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    after = trainer.evaluate() if "validation" in datasets else {}
    trainer.save_flex_model(args.output_dir)
    summary = {
        "train": result.metrics, "eval_before": before, "eval_after": after, "model": script.model,
        "lora_r": args.lora_r, "budgets": trainer.budgets, "architectures": trainer.architecture_report(),
        "tokens_per_budget": {budget_key(b): n for b, n in sorted_buckets(trainer.tokens_per_budget)},
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        if script.extract_budgets:
            summary["sub_models"] = save_sub_models(args.output_dir, tokenizer, trainer.budgets)
        with open(os.path.join(args.output_dir, "sft_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        logger.info("saved the fine-tuned LlamaFlex model, sub-models and sft_summary.json to %s", args.output_dir)
    return summary


__all__ = ["FlexSFTConfig", "FlexSFTTrainer", "load_chat_datasets", "main"]

if __name__ == "__main__":
    main()
