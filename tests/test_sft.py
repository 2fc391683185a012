"""Supervised fine-tuning of the family with TRL: FlexSFTTrainer / FlexSFTConfig, the chat set, the script."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch
from conftest import tiny_llama, word_tokenizer
from datasets import Dataset

from modeling_llamaflex import LlamaFlexForCausalLM
from training.arguments import FlexArguments, FlexTrainingArguments
from training.chat_data import build_chat_data
from training.sft import FlexSFTConfig, FlexSFTTrainer
from training.trainer import FlexTrainer

COLORS = ["red", "green", "blue", "black", "white", "gold"]
THINGS = ["sky", "grass", "sea", "night", "snow", "sun", "leaf", "coal"]
ANSWER = dict(zip(THINGS, ["blue", "green", "blue", "black", "white", "gold", "green", "black"]))


def chats(n: int, seed: int = 0) -> Dataset:
    """'what color is the <thing> ?' -> '<color>': a fixed mapping a tiny model learns in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        rows.append([{"role": "user", "content": f"what color is the {thing} ?"}, {"role": "assistant", "content": ANSWER[thing]}])
    return Dataset.from_dict({"messages": rows})


def tokenizer_and_model(budgets=(0.5, 0.75)):
    tokenizer = word_tokenizer(COLORS + THINGS + ["what", "color", "is", "the"])
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama(vocab_size=len(tokenizer)), budgets=list(budgets))
    return tokenizer, flex


def sft_config(tmp_path, **overrides) -> FlexSFTConfig:
    values = dict(
        output_dir=str(tmp_path / "sft"), max_steps=12, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=1e-2, router_learning_rate=2e-3, modulation_learning_rate=2e-3, logging_steps=4,
        report_to=[], save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
        assistant_only_loss=True, full_budget_probability=0.25, hard_sample_probability=0.5, max_length=32,
        dataloader_num_workers=0, seed=0,
    )
    values.update(overrides)
    return FlexSFTConfig(**values)


def test_sft_config_and_trainer_share_the_flex_code():
    flex_fields = {f.name for f in dataclasses.fields(FlexArguments)}
    assert flex_fields <= {f.name for f in dataclasses.fields(FlexSFTConfig)}
    assert flex_fields <= {f.name for f in dataclasses.fields(FlexTrainingArguments)}
    config = FlexSFTConfig(output_dir="x", use_cpu=True, bf16=False)
    assert (config.lm_loss_weight, config.distillation_weight) == (1.0, 0.0)  # SFT loss, no teacher by default


def test_sft_trainer_samples_and_computes_the_flex_trainers_loss(tmp_path):
    """Given the same flex knobs and batch, FlexSFTTrainer and FlexTrainer sample the same budgets and routes and
    compute the same losses, step after step."""
    tokenizer, flex = tokenizer_and_model()
    sft = FlexSFTTrainer(model=copy.deepcopy(flex), args=sft_config(tmp_path, hard_sample_probability=0.5),
                         train_dataset=chats(16), processing_class=tokenizer)
    knobs = {f.name: getattr(sft.args, f.name) for f in dataclasses.fields(FlexArguments)}
    plain = FlexTrainer(model=copy.deepcopy(flex), train_dataset=sft.train_dataset,
                        args=FlexTrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to=[],
                                                   seed=0, **knobs))
    batch = sft.data_collator([sft.train_dataset[i] for i in range(8)])
    losses = {}
    for name, trainer in (("sft", sft), ("plain", plain)):
        trainer.model.train()
        losses[name] = []
        for step in range(6):
            trainer.state.global_step = step
            losses[name].append(trainer.compute_loss(trainer.model, batch).item())
    assert sft.sample_log == plain.sample_log and {hard for *_, hard in sft.sample_log} == {True, False}
    assert len({b for _, _, b, _ in sft.sample_log}) > 1  # several budgets were drawn
    assert losses["sft"] == pytest.approx(losses["plain"], rel=1e-6)


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full-weights", "lora"])
def test_sft_lowers_the_loss_at_every_trained_budget(tmp_path, lora_r):
    tokenizer, flex = tokenizer_and_model()
    frozen = {n: p.detach().clone() for n, p in flex.named_parameters() if "router" not in n and "modulation" not in n}
    trainer = FlexSFTTrainer(
        model=flex, args=sft_config(tmp_path, lora_r=lora_r), train_dataset=chats(96), eval_dataset=chats(16, seed=1),
        processing_class=tokenizer,
    )
    # assistant-only labels: the answer and the end-of-turn token, nothing of the question
    labels = trainer.train_dataset[0]["labels"]
    assert 1 <= sum(label != -100 for label in labels) <= 3
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert set(trainer.tokens_per_budget) == {0.5, 0.75, 1.0}  # every budget was trained
    for budget in ("0.5", "0.75", "1"):
        key = f"eval_b{budget}_loss"
        assert after[key] < before[key] - 0.1, (key, before[key], after[key])
    if lora_r:  # the base stayed frozen: only adapters, routers and modulation trained
        assert [g["name"] for g in trainer.optimizer.param_groups] == ["lora", "router", "modulation"]
        for name, p in trainer.flex.named_parameters():
            plain = name.replace(".base_layer", "")
            if plain in frozen:
                assert torch.equal(p.detach(), frozen[plain]), name


def test_budget_out_of_range_is_refused_before_training(tmp_path):
    tokenizer, flex = tokenizer_and_model()
    for bad, message in [("0.01", r"cannot train budget '0.01' \(from budgets\).*allowed budgets are"),
                         (1.5, r"cannot train budget 1.5 .*outside \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            FlexSFTTrainer(model=flex, args=sft_config(tmp_path, budgets=[bad]), train_dataset=chats(8), processing_class=tokenizer)
    with pytest.raises(TypeError, match="FlexSFTTrainer needs FlexSFTConfig"):
        FlexSFTTrainer(model=flex, args=FlexTrainingArguments(output_dir=str(tmp_path)), train_dataset=chats(8),
                       processing_class=tokenizer)
    with pytest.raises(ValueError, match="padding-free"):
        FlexSFTTrainer(model=flex, args=sft_config(tmp_path, padding_free=True, max_length=None), train_dataset=chats(8),
                       processing_class=tokenizer)


def test_explicit_budgets_are_the_ones_trained(tmp_path):
    tokenizer, flex = tokenizer_and_model()
    trainer = FlexSFTTrainer(model=flex, args=sft_config(tmp_path, budgets=["0.6"], max_steps=4, full_budget_probability=0.0),
                             train_dataset=chats(32), processing_class=tokenizer)
    assert trainer.budgets == [0.6]
    trainer.train()
    assert set(trainer.tokens_per_budget) == {0.6}


def _write_corpus(root, works: dict[str, int]) -> None:
    (root / "works").mkdir(parents=True)
    for name, n in works.items():
        blocks = [f"ACT I.\n\nScene I. A place.\n\n[Enter {name}.]"]
        for i in range(n):
            speaker = ["Ber.", "First Clown.", "GLOUCESTER."][i % 3]
            blocks.append(f"{speaker}\nThis is the line number {i} of {name} here,\nand this one follows line {i} there.")
        (root / "works" / f"{name}.txt").write_text("\n\n".join(blocks) + "\n")


def test_chat_data_builds_question_answer_conversations(tmp_path):
    _write_corpus(tmp_path, {"lear": 30, "hamlet": 20})
    paths = build_chat_data(tmp_path, n_train=20, n_validation=8)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    validation = [json.loads(line) for line in paths["validation"].read_text().splitlines()]
    assert len(train) == 20 and len(validation) == 8
    assert {r["work"] for r in train} == {"lear"} and {r["work"] for r in validation} == {"hamlet"}  # held out
    assert {r["kind"] for r in train} == {"speaker", "next_line"}
    for row in train:
        (user, assistant) = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        if row["kind"] == "speaker":
            assert assistant["content"] in {"Ber", "First Clown", "GLOUCESTER"}  # never 'ACT I' or 'Scene I'
        else:
            assert assistant["content"].startswith("and this one follows line")
    assert build_chat_data(tmp_path, tmp_path / "again", n_train=20, n_validation=8)["train"].read_text() == paths["train"].read_text()


def test_sft_script_end_to_end(tmp_path):
    from training import sft

    tokenizer, flex = tokenizer_and_model()
    flex.save_pretrained(tmp_path / "flex")
    tokenizer.chat_template = None  # the script sets its simple template
    tokenizer.save_pretrained(tmp_path / "flex")
    for split, n in (("train", 32), ("validation", 8)):
        chats(n, seed=len(split)).to_json(tmp_path / f"{split}.jsonl")
    summary = sft.main([
        "--model", str(tmp_path / "flex"), "--train_file", str(tmp_path / "train.jsonl"),
        "--validation_file", str(tmp_path / "validation.jsonl"), "--output_dir", str(tmp_path / "out"),
        "--lora_r", "4", "--max_steps", "3", "--per_device_train_batch_size", "8", "--max_length", "32",
        "--assistant_only_loss", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--use_cpu", "true",
        "--report_to", "none", "--save_strategy", "no", "--learning_rate", "1e-2",
    ])
    out = tmp_path / "out"
    assert summary["lora_r"] == 4 and set(summary["eval_after"]) >= {"eval_b0.5_loss", "eval_b1_loss"}
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "sub-models" / "budget-0.75" / "config.json").exists()
    merged = LlamaFlexForCausalLM.from_pretrained(out)  # a plain LlamaFlex checkpoint, the adapter merged in
    sub = merged.extract(0.5)
    ids = torch.tensor([tokenizer("what color is the sea ?")["input_ids"]])
    torch.testing.assert_close(sub(ids).logits, merged(ids, budget=0.5).logits, atol=1e-5, rtol=0)
