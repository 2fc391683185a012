"""Per-request sampling (temperature, top-p, seed) and incremental detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of its tokens. temperature 0 is greedy; `seed` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def generator(self, device) -> torch.Generator | None:
        """The request's own random stream: its tokens do not depend on what else is in its batch."""
        if self.temperature == 0:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of next-token logits (vocab,)."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = TemperatureLogitsWarper(params.temperature)(None, logits[None].float())  # generate()'s own warpers
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return int(torch.multinomial(scores.softmax(-1)[0], 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` might still become a stop string (or an unfinished character)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):  # a multi-byte character split over tokens: wait for the rest
        hold = max(hold, 1)
    return hold


@dataclass
class TextTracker:
    """The text of the tokens generated so far, what of it was sent, and whether a stop string ended it."""

    tokenizer: object
    stops: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    sent: int = 0
    stopped: bool = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Take one token; return the new text that is safe to send (held back if it may start a stop string)."""
        self.token_ids.append(token_id)
        text = self._text()
        cut = min((text.find(s) for s in self.stops if s and s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(text[:cut])
        return self._send(text[: len(text) - _held_back(text, self.stops)])

    def flush(self) -> str:
        """At the end: whatever was held back (nothing after a stop string)."""
        return "" if self.stopped else self._send(self._text())

    def _send(self, text: str) -> str:
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta


__all__ = ["SamplingParams", "TextTracker", "sample_token"]
