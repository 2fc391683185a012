"""Shared fixtures and helpers: tiny random Llama parents (fp32) and LlamaFlex models built from them, tiny
training runs, tiny checkpoints and lm-eval-shaped results for the evaluation and model-card tests.
Test modules import helpers from here, never from each other."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from modeling_llamaflex import LlamaFlexForCausalLM

ROOT = Path(__file__).resolve().parent.parent  # the repository

torch.set_num_threads(1)  # tiny models: threads only add contention (and spin-waits on a busy machine)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (run with `-m slow`; CI runs them)")


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A tiny GQA Llama: hidden 64, 8 query heads in 2 KV groups (head_dim 16), MLP 128, 4 layers."""
    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():  # norms away from 1 so that slicing them is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (2, 12))


# ---- models ----

ATOL = 1e-5
# what a refused config raises: our ValueErrors, which @strict configs wrap in huggingface_hub's StrictDataclassError
CONFIG_ERRORS = (ValueError, StrictDataclassError)


def non_embedding_parameters(model: LlamaForCausalLM) -> int:
    skip = {"model.embed_tokens.weight", "lm_head.weight"}
    return sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n not in skip)


def elastic(llama, **elastic_options) -> LlamaFlexForCausalLM:
    """A flex model with a non-trivial layer ranking and random (non-zero) modulation, so folding is tested."""
    elastic_options.setdefault("layer_ranking", [2, 0, 3, 1])
    flex = LlamaFlexForCausalLM.from_llama(llama, **elastic_options)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in flex.model.modulation.parameters():
            p.normal_(0, 0.2)
    return flex


# ---- training ----

def dataset(n: int = 64, length: int = 16, seed: int = 0):
    """A random token data set of `n` rows (input_ids = labels), vocabulary 3..127 as tiny_llama."""
    from datasets import Dataset

    torch.manual_seed(seed)
    ids = torch.randint(3, 128, (n, length)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * length] * n})


def arguments(tmp_path, **overrides):
    """FlexTrainingArguments for a few CPU steps on `dataset()`, `overrides` on top."""
    from training.arguments import FlexTrainingArguments

    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, logging_steps=3,
        report_to=[], learning_rate=1e-3, save_strategy="no", use_cpu=True, lm_loss_weight=0.5,
        full_budget_probability=0.25, hard_sample_probability=0.5, dataloader_num_workers=0, seed=0,
    )
    values.update(overrides)
    return FlexTrainingArguments(**values)


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps (an interrupted run, for resume tests)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# ---- evaluation and the model card ----

WORDS = ("king queen lord lady night day heaven earth love death sword crown blood honour grave ghost father "
         "mother son daughter storm sea island spirit sleep dream murder castle throne hand heart eye tongue").split()


def play_text(seed: int = 0, speeches: int = 80) -> str:
    """A tiny play laid out like the Gutenberg Shakespeare texts: speaker line, spoken lines, blank line."""
    rng = random.Random(seed)
    blocks = ["THE TRAGEDY OF TESTING", "ACT I.", "Scene I. A room in the castle."]
    for i in range(speeches):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))).capitalize() + rng.choice(",.;:!?")
                 for _ in range(rng.randint(1, 6))]
        if i % 7 == 0:
            lines.insert(1, "[Aside.]")
        blocks.append("\n".join([rng.choice(["Ham.", "Hor.", "King.", "Queen.", "First Clown."]), *lines]))
        if i % 10 == 9:
            blocks.append("[Exeunt.]")
    return "\n\n".join(blocks) + "\n"


def make_checkpoint(root: Path, budgets=(0.5, 0.75)) -> tuple[Path, Path, Path]:
    """A tiny LlamaFlex checkpoint with a byte-level BPE tokenizer, its plain Llama parent, and a text file."""
    from training.corpus import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    text = root / "play.txt"
    text.write_text(play_text())
    model_dir, parent_dir = root / "flex", root / "parent"
    tokenizer = train_tokenizer([text], model_dir, vocab_size=300)
    parent = tiny_llama(vocab_size=len(tokenizer))
    LlamaFlexForCausalLM.from_llama(parent, budgets=list(budgets)).save_pretrained(model_dir)
    parent.save_pretrained(parent_dir)
    tokenizer.save_pretrained(parent_dir)
    return model_dir, parent_dir, text


def fake_results(out: Path, label: str, model_args: dict, results: dict, shots: int = 0, stamp: str = "00",
                 groups: dict | None = None) -> None:
    """A results file shaped like lm-eval 0.4.13's, as run_all.sh lays them out."""
    path = out / "raw" / label / f"{shots}shot" / "model" / f"results_2026-01-01T00-00-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = {t: {"dataset_path": "json" if t.startswith("flex") else f"org/{t}", "dataset_name": None,
                   "test_split": "test"} for t in results}
    data = {"results": results, "group_subtasks": groups or {}, "configs": configs,
            "n-shot": {t: shots for t in results}, "higher_is_better": {},
            "config": {"model_args": model_args, "limit": 4.0, "model_num_parameters": 1000}}
    path.write_text(json.dumps(data))


NLL = (1.6, 1.55, 1.5, 1.495)  # flex_ppl's nll_per_byte by budget (± 0.01): the last step is within its error


def fake_output(out: Path, model_dir: Path, parent_dir: Path | None = None) -> None:
    """lm-eval-shaped results of four budgets (and the parent) under `out`, as run_all.sh lays them out."""
    from eval import plan

    for i, b in enumerate((0.375, 0.5, 0.625, 1.0)):
        args = {"pretrained": str(model_dir), "trust_remote_code": True, "budget": b}
        fake_results(out, plan.budget_label(b), args, {
            "flex_lambada": {"alias": "flex_lambada", "acc,none": 0.1 * i, "acc_stderr,none": 0.01,
                             "perplexity,none": 50.0 - i},
            "flex_ppl": {"nll_per_byte,none": NLL[i], "nll_per_byte_stderr,none": 0.01,
                         "word_perplexity,none": 100.0 - i, "word_perplexity_stderr,none": "N/A",
                         "bits_per_byte,none": 2.0},
        })
        fake_results(out, plan.budget_label(b), args, shots=5, groups={"mmlu": ["mmlu_a", "mmlu_b"]}, results={
            "mmlu": {"acc,none": 0.25 + 0.01 * i}, "mmlu_a": {"acc,none": 0.2}, "mmlu_b": {"acc,none": 0.3},
        })
    fake_results(out, plan.budget_label(0.5), {"pretrained": str(model_dir), "budget": 0.5}, stamp="59",
                 results={"flex_lambada": {"acc,none": 0.9, "perplexity,none": 3.0}})  # a newer run wins
    if parent_dir is not None:
        fake_results(out, "parent", {"pretrained": str(parent_dir)}, {"flex_lambada": {"acc,none": 0.5}})


def check_card(model_dir: Path, results_path: Path, out: Path, *extra: str, license: str = "apache-2.0"):
    """Generate the card, load it back with huggingface_hub and check its model-index against results.json."""
    from huggingface_hub import ModelCard

    from model_card import generate

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


def word_tokenizer(words: list[str]):
    """A word-level tokenizer (pad 0, bos 1, eos 2, as tiny_llama) with the chat template of chat_data.py."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from training.chat_data import CHAT_TEMPLATE

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) | {"User", "Assistant", ":", "?", '"'}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
