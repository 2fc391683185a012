"""process_results of the local ``flex_ppl`` task (eval/build_tasks.py copies this file next to its YAML).

lm-eval resolves ``process_results: !function flex_ppl_utils.process_results`` from the YAML's own folder, so
this module must stay self-contained (standard library only, no project imports).

Besides lm-eval's corpus-level rolling-perplexity metrics (``word_perplexity``, ``byte_perplexity``,
``bits_per_byte``: one number for the whole corpus, standard error "N/A"), it gives one value per document,

    nll_per_byte = -loglikelihood(document) / UTF-8 bytes of the document     (nats per byte)

aggregated with ``mean``, so that lm-eval reports its standard error (sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import re


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word_perplexity (ConfigurableTask.count_words)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 bytes, as lm-eval counts them for byte_perplexity and bits_per_byte."""
    return len(text.encode("utf-8"))


def process_results(doc: dict, results) -> dict:
    """Per-document scores from one ``(loglikelihood,)`` result of a loglikelihood_rolling request.

    The three standard metrics keep lm-eval's (loglikelihood, count) pairs, which the YAML aggregates with
    ``weighted_perplexity`` / ``bits_per_byte`` exactly as lm-eval's built-in rolling-perplexity tasks do.
    """
    (loglikelihood,) = results
    text = doc["text"]  # the task's doc_to_target is "{{text}}", the text scored
    n_bytes = count_bytes(text)
    return {
        "nll_per_byte": -loglikelihood / n_bytes,
        "word_perplexity": (loglikelihood, count_words(text)),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
