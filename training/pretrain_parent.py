"""Pretrain the small plain Llama parent of the CPU default.

LLaMaFlex starts from a pretrained Llama. No weights can come from the hub here, so this script
trains one from scratch on the offline Shakespeare corpus (:mod:`training.corpus`) with
``transformers.Trainer``, then saves it as a standard Llama checkpoint together with its tokenizer:
``AutoModelForCausalLM.from_pretrained(output_dir)`` and ``AutoTokenizer.from_pretrained(output_dir)``
load it with no custom code.

    python -m training.pretrain_parent --output_dir runs/parent

fetches the corpus and trains the tokenizer if they are not cached yet (``.cache/shakespeare``),
trains for ``--max_steps`` or until ``--max_minutes`` have passed, evaluates on the held-out plays
(Hamlet, Macbeth, The Tempest) and reports the validation loss next to an add-0.1 bigram's on the
same tokens. Any other text works too: ``--train_file/--validation_file`` or ``--dataset_name`` (see
:class:`training.data.DataArguments`) with ``--tokenizer_dir`` naming a saved tokenizer. ``--tiny``
swaps in a two-layer model for tests and smoke runs.

The default model keeps what the rest of the project needs from a parent: grouped-query attention
with at least two KV heads and at least two query heads per KV group, so that the elastic ``heads``
axis can keep a prefix of heads within each group.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import (AutoTokenizer, HfArgumentParser, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed)

from training.corpus import DEFAULT_CACHE_DIR, bigram_loss, fetch_shakespeare, train_tokenizer
from training.data import DataArguments, build_lm_datasets, lm_data_collator

logger = logging.getLogger(__name__)

TRAINING_DEFAULTS: dict = {
    "output_dir": "runs/parent",
    "max_steps": 600,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_strategy": "no",
    "report_to": "none",
    "include_num_input_tokens_seen": True,
    "dataloader_pin_memory": False,
    "seed": 42,
}
"""``TrainingArguments`` defaults of the CPU parent: at most 600 steps of 16 x 256 tokens (2.46M tokens);
with ``max_minutes=10`` the clock usually ends the run first on 2 cores."""


@dataclass
class ParentArguments:
    """Size of the parent Llama, its tokenizer, and the time cap of the run."""

    hidden_size: int = field(default=256, metadata={"help": "Width of the residual stream."})
    intermediate_size: int = field(default=704, metadata={"help": "Width of the SwiGLU MLP."})
    num_hidden_layers: int = field(default=6, metadata={"help": "Number of decoder layers."})
    num_attention_heads: int = field(
        default=8, metadata={"help": "Query heads (head_dim = hidden_size / num_attention_heads)."})
    num_key_value_heads: int = field(
        default=2, metadata={"help": "KV heads (GQA groups); at least 2, each serving at least 2 query heads."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share the input embedding and the LM head."})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base."})
    initializer_range: float = field(default=0.02, metadata={"help": "Std of the normal weight init."})
    tiny: bool = field(
        default=False,
        metadata={"help": "Use a tiny model (hidden 64, MLP 128, 2 layers, 4 heads / 2 KV) for tests and "
                          "smoke runs; overrides the size knobs above."})
    vocab_size: int = field(
        default=4096, metadata={"help": "Vocabulary of the BPE trained on the Shakespeare corpus (if it is trained)."})
    tokenizer_dir: str | None = field(
        default=None,
        metadata={"help": "A saved tokenizer to use. Default: CORPUS_DIR/tokenizer-VOCAB_SIZE, trained on the "
                          "Shakespeare training split if missing. Required with your own training text."})
    corpus_dir: str = field(
        default=str(DEFAULT_CACHE_DIR), metadata={"help": "Cache folder of the Shakespeare corpus."})
    max_minutes: float | None = field(
        default=10.0,
        metadata={"help": "Stop training after this many minutes (evaluations included) or at max_steps, whichever "
                          "comes first; the model is then evaluated and saved as usual. <= 0 for no limit."})
    lr_schedule_follows_time: bool = field(
        default=True,
        metadata={"help": "With max_minutes: decay the learning rate (warmup, then cosine to min_lr_rate) over "
                          "whichever of max_steps or max_minutes runs out first, instead of lr_scheduler_type."})

    def __post_init__(self) -> None:
        if self.tiny:
            self.hidden_size, self.intermediate_size, self.num_hidden_layers = 64, 128, 2
            self.num_attention_heads, self.num_key_value_heads = 4, 2
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % heads or heads % kv or kv < 2 or heads // kv < 2:
            raise ValueError(
                f"hidden_size={self.hidden_size}, num_attention_heads={heads}, num_key_value_heads={kv}: the "
                "parent needs num_attention_heads dividing hidden_size, and grouped-query attention with at "
                "least 2 KV heads and at least 2 query heads per KV head (LlamaFlex keeps heads per group).")


class TimeLimitCallback(TrainerCallback):
    """Stop training once ``max_minutes`` of wall time have passed since training began.

    Checked after every optimizer step, so the run ends at most one step (plus a scheduled
    evaluation) past the limit. :meth:`fraction_used` lets the learning-rate schedule follow the
    clock (see :class:`ParentTrainer`).
    """

    def __init__(self, max_minutes: float) -> None:
        self.max_seconds = max_minutes * 60.0
        self.start = time.monotonic()
        self.stopped_early = False

    def fraction_used(self) -> float:
        """Elapsed share of the time limit (0 at the start of training, 1 when it is reached)."""
        return (time.monotonic() - self.start) / self.max_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.fraction_used() >= 1.0 and not control.should_training_stop and state.global_step < state.max_steps:
            logger.warning("Time limit of %.1f minutes reached at step %d of %d: stopping training.",
                           self.max_seconds / 60, state.global_step, state.max_steps)
            control.should_training_stop = True
            self.stopped_early = True
        return control


def time_aware_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    time_fraction: Callable[[], float],
    min_lr_rate: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then cosine decay to ``min_lr_rate`` x the peak, driven by steps *or* time.

    After warmup, progress is the larger of the share of steps done and ``time_fraction()`` (the
    share of a time limit used), so the learning rate has fully decayed when either runs out. With
    a time fraction that never leads, this is transformers' ``cosine_with_min_lr`` schedule.
    """

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        by_steps = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        progress = min(1.0, max(by_steps, time_fraction()))
        return min_lr_rate + (1.0 - min_lr_rate) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


class ParentTrainer(Trainer):
    """``Trainer`` whose learning rate, under a time limit, decays over the limit or ``max_steps``.

    On a shared or slow machine a run cut short by ``--max_minutes`` would otherwise stop with its
    learning rate still high; here it ends decayed whichever limit comes first (the idea of a
    budget-scaled schedule, as in Geiping & Goldstein's "Cramming"). Without a time limit it is a
    plain ``Trainer``.
    """

    def __init__(self, *args, time_limit: TimeLimitCallback | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.time_limit = time_limit

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.time_limit is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = time_aware_cosine_schedule(
            optimizer or self.optimizer,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            time_fraction=self.time_limit.fraction_used,
            min_lr_rate=(self.args.lr_scheduler_kwargs or {}).get("min_lr_rate", 0.0),
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler


def load_or_train_tokenizer(args: ParentArguments, data_args: DataArguments) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``args``; on the default corpus, train and cache it if it is missing."""
    uses_default_corpus = data_args.train_file is None and data_args.dataset_name is None
    if args.tokenizer_dir is not None:
        if not (Path(args.tokenizer_dir) / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"tokenizer_dir={args.tokenizer_dir!r} holds no saved tokenizer "
                                    "(tokenizer_config.json); save one with `save_pretrained` or leave it unset.")
        return AutoTokenizer.from_pretrained(args.tokenizer_dir)
    if not uses_default_corpus:
        raise ValueError("With your own training text, give --tokenizer_dir (a saved tokenizer, e.g. from "
                         "training.corpus.train_tokenizer).")
    tok_dir = Path(args.corpus_dir) / f"tokenizer-{args.vocab_size}"
    if (tok_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(tok_dir))
    files = fetch_shakespeare(args.corpus_dir)
    return train_tokenizer([files.train], tok_dir, vocab_size=args.vocab_size)


def build_parent(args: ParentArguments, tokenizer: PreTrainedTokenizerBase, block_size: int) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` of the size in ``args``, for ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.hidden_size // args.num_attention_heads,
        max_position_embeddings=block_size,
        rope_theta=args.rope_theta,
        initializer_range=args.initializer_range,
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def count_parameters(model: LlamaForCausalLM) -> tuple[int, int]:
    """(total, non-embedding) parameters; tied weights count once, non-embedding = layers + final norm."""
    total = model.num_parameters()
    non_embedding = sum(p.numel() for p in model.model.layers.parameters()) + \
        sum(p.numel() for p in model.model.norm.parameters())
    return total, non_embedding


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse arguments, pretrain, evaluate, save; returns the summary that it also prints and saves."""
    parser = HfArgumentParser((ParentArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    parent_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    t_start = time.monotonic()
    set_seed(training_args.seed)

    # Data: the Shakespeare corpus unless a source is given.
    tokenizer = load_or_train_tokenizer(parent_args, data_args)
    if data_args.train_file is None and data_args.dataset_name is None:
        corpus = fetch_shakespeare(parent_args.corpus_dir)
        data_args.train_file, data_args.validation_file = str(corpus.train_jsonl), str(corpus.validation_jsonl)
    tokenizer.model_max_length = data_args.block_size
    datasets = build_lm_datasets(data_args, tokenizer)

    model = build_parent(parent_args, tokenizer, data_args.block_size)
    total_params, non_embedding_params = count_parameters(model)
    logger.info("Parent: %s; %.2fM parameters, %.2fM non-embedding", model.config.to_diff_dict(),
                total_params / 1e6, non_embedding_params / 1e6)

    callbacks: list[TrainerCallback] = []
    time_limit = None
    if parent_args.max_minutes is not None and parent_args.max_minutes > 0:
        time_limit = TimeLimitCallback(parent_args.max_minutes)
        callbacks.append(time_limit)
    trainer = ParentTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=lm_data_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
        time_limit=time_limit if parent_args.lr_schedule_follows_time else None,
    )
    train_result = trainer.train()

    # Final validation loss: reuse the last scheduled evaluation if it was at the final step.
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    eval_runtime = sum(h["eval_runtime"] for h in evals)  # evaluation time within train_runtime
    if evals and evals[-1]["step"] == trainer.state.global_step:
        eval_loss = evals[-1]["eval_loss"]
    else:
        eval_loss = trainer.evaluate()["eval_loss"]
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]

    out = Path(training_args.output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    bigram = None
    if not data_args.streaming:
        bigram = bigram_loss(datasets["train"].with_format("numpy")["input_ids"],
                             datasets["validation"].with_format("numpy")["input_ids"], len(tokenizer))
    world = training_args.world_size
    tokens_seen = int(trainer.state.num_input_tokens_seen) or (
        trainer.state.global_step * training_args.per_device_train_batch_size * world
        * training_args.gradient_accumulation_steps * data_args.block_size)
    train_runtime = train_result.metrics["train_runtime"]
    summary = {
        "output_dir": str(out),
        "train_file": data_args.train_file or data_args.dataset_name,
        "validation_file": data_args.validation_file,
        "train_blocks": len(datasets["train"]) if not data_args.streaming else None,
        "validation_blocks": len(datasets["validation"]) if not data_args.streaming else None,
        "block_size": data_args.block_size,
        "vocab_size": len(tokenizer),
        "config": {k: getattr(model.config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings")},
        "parameters": total_params,
        "non_embedding_parameters": non_embedding_params,
        "steps": trainer.state.global_step,
        "max_steps": training_args.max_steps,
        "stopped_by_time_limit": bool(time_limit and time_limit.stopped_early),
        "tokens_seen": tokens_seen,
        "train_runtime_s": round(train_runtime, 1),
        "eval_runtime_in_training_s": round(eval_runtime, 1),
        "train_tokens_per_s": round(tokens_seen / max(train_runtime - eval_runtime, 1e-9), 1),
        "wall_time_s": round(time.monotonic() - t_start, 1),
        "validation_loss": round(eval_loss, 4),
        "validation_perplexity": round(math.exp(eval_loss), 2),
        "bigram_add0.1_validation_loss": round(bigram, 4) if bigram is not None else None,
        "eval_history": [(h["step"], round(h["eval_loss"], 4)) for h in evals],
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(["python -m training.pretrain_parent", *(sys.argv[1:] if argv is None else argv)]),
    }
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nSaved the parent Llama and its tokenizer to {out}")
    print(f"  model:      {total_params / 1e6:.2f}M parameters ({non_embedding_params / 1e6:.2f}M non-embedding), "
          f"vocab {len(tokenizer)}, {summary['config']}")
    print(f"  training:   {summary['steps']} steps, {tokens_seen:,} tokens, {train_runtime / 60:.1f} min "
          f"({summary['train_tokens_per_s']:,.0f} tokens/s without evaluation)"
          + (" - stopped by --max_minutes" if summary["stopped_by_time_limit"] else ""))
    print(f"  validation: loss {eval_loss:.4f} nats/token (perplexity {math.exp(eval_loss):.1f})"
          + (f"; add-0.1 bigram baseline {bigram:.4f}" if bigram is not None else ""))
    return summary


if __name__ == "__main__":
    main()
