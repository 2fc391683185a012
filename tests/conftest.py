"""Shared fixtures: tiny random Llama parents (fp32) and LlamaFlex models built from them."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

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
