"""A small offline chat set for supervised fine-tuning: question/answer conversations about Shakespeare's lines.

Built from the corpus of `training/corpus.py` (`.cache/shakespeare/works/*.txt`): the plays' speeches are
parsed (a speaker tag such as ``Ber.`` on its own line, then the speech), and two kinds of one-turn
conversations are drawn with a fixed seed:

* "Who speaks the line "<line>"?"  ->  the speaker tag, without its final dot ("Ber");
* "What comes after "<line>"?"     ->  the next line of the same speech.

Training conversations come from the training works, validation ones from the held-out works (Hamlet,
Macbeth, The Tempest), so the validation questions are about plays the model never saw. Each row is
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "kind": "speaker" | "next_line",
"work": name}``, written as JSONL (``train.jsonl``, ``validation.jsonl``), ready for
``datasets.load_dataset("json", ...)`` and TRL's `SFTTrainer`.

    python -m training.chat_data --corpus_dir .cache/shakespeare --out .cache/shakespeare/chat
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from training.corpus import DEFAULT_CACHE_DIR, HELD_OUT

SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,22}\.$")
"""A speaker tag alone on its line: 'Ber.', 'First Clown.', 'Lady M.', 'GLOUCESTER.'."""
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")

# A simple template for tokenizers without one. {% generation %} marks the assistant's tokens, so TRL's
# `assistant_only_loss=True` trains on the answers only.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% else %}{{ 'User: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) for every speech of a play: blocks separated by blank lines, opened by a speaker tag."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]) or HEADING.match(lines[0]):
            continue
        spoken = [line for line in lines[1:] if line and not line.startswith("[")]
        if spoken:
            out.append((lines[0][:-1], spoken))
    return out


def _usable(line: str) -> bool:
    return 20 <= len(line) <= 90


def conversations(works: dict[str, str], n: int, seed: int) -> list[dict]:
    """`n` conversations drawn from `works` ({name: text}), half of each kind, deterministic in `seed`."""
    rng = random.Random(seed)
    speaker_items, next_items = [], []
    for name in sorted(works):
        for speaker, lines in speeches(works[name]):
            speaker_items += [(name, line, speaker) for line in lines if _usable(line)]
            next_items += [(name, a, b) for a, b in zip(lines, lines[1:]) if _usable(a) and _usable(b)]
    if len(speaker_items) < n // 2 or len(next_items) < n - n // 2:
        raise ValueError(f"the works {sorted(works)} hold too few speeches for {n} conversations")
    rows = []
    for name, line, speaker in rng.sample(speaker_items, n // 2):
        rows.append(_row(f'Who speaks the line "{line}"?', speaker, "speaker", name))
    for name, line, after in rng.sample(next_items, n - n // 2):
        rows.append(_row(f'What comes after "{line}"?', after, "next_line", name))
    rng.shuffle(rows)
    return rows


def _row(question: str, answer: str, kind: str, work: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "kind": kind, "work": work}


def build_chat_data(
    corpus_dir: str | Path = DEFAULT_CACHE_DIR, out: str | Path | None = None, n_train: int = 400,
    n_validation: int = 64, seed: int = 0,
) -> dict[str, Path]:
    """Write `train.jsonl` and `validation.jsonl` under `out` (default `<corpus_dir>/chat`); returns their paths."""
    corpus_dir = Path(corpus_dir)
    works_dir = corpus_dir / "works"
    if not works_dir.is_dir():
        raise FileNotFoundError(
            f"{works_dir} does not exist: build the corpus first (python -m training.corpus --out {corpus_dir})"
        )
    works = {p.stem: p.read_text(encoding="utf-8") for p in sorted(works_dir.glob("*.txt"))}
    splits = {
        "train": ({k: v for k, v in works.items() if k not in HELD_OUT}, n_train),
        "validation": ({k: v for k, v in works.items() if k in HELD_OUT}, n_validation),
    }
    out = Path(out) if out is not None else corpus_dir / "chat"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, (texts, n) in splits.items():
        paths[split] = out / f"{split}.jsonl"
        with open(paths[split], "w", encoding="utf-8") as fh:
            for row in conversations(texts, n, seed + (split == "validation")):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--out", default=None, help="output folder (default: <corpus_dir>/chat)")
    parser.add_argument("--n_train", type=int, default=400)
    parser.add_argument("--n_validation", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_chat_data(args.corpus_dir, args.out, args.n_train, args.n_validation, args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
