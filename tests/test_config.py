"""Config validation: bad choices are refused at config time, naming the field and what is allowed."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIG_ERRORS, tiny_llama_config

from modeling_llamaflex import LlamaFlexConfig, budget_loss, count_parameters, default_choices, parse_budget
from modeling_llamaflex.architecture import smallest_budget


def flex_config(**elastic) -> LlamaFlexConfig:
    return LlamaFlexConfig.from_llama_config(tiny_llama_config(), **elastic)


def test_default_choices_end_at_the_parent():
    config = flex_config()
    assert config.choices["hidden"][-1] == 64 and config.choices["heads"][-1] == 8
    assert config.choices["mlp"][-1] == 128 and config.choices["depth"][-1] == 4
    assert all(c % 2 == 0 for c in config.choices["heads"])
    assert config.layer_ranking == [0, 1, 2, 3]
    assert config.to_llama_config().model_type == "llama"


def test_default_choices_for_llama31_8b():
    from transformers import LlamaConfig

    choices = default_choices(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8))
    assert choices["hidden_choices"] == [2048, 2560, 3072, 3584, 4096]
    # 24 heads is left out: 4096 % 24 != 0, and transformers' LlamaConfig refuses such a sub-model
    assert choices["head_choices"] == [16, 32]
    assert choices["depth_choices"] == [16, 18, 20, 22, 24, 26, 28, 30, 32]  # a sixteenth of the layers per step
    # a quarter to all of the MLP in sixteenths (896 neurons), rounded to multiples of 256
    assert choices["mlp_choices"] == [3584, 4608, 5376, 6144, 7168, 8192, 8960, 9728, 10752, 11776, 12544, 13312, 14336]
    first = default_choices(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8), steps=8)
    assert first["depth_choices"] == [16, 20, 24, 28, 32]  # the first release's eighths, kept for comparisons
    assert first["mlp_choices"] == [3584, 5376, 7168, 8960, 10752, 12544, 14336]
    assert first["hidden_choices"] == choices["hidden_choices"] and first["head_choices"] == choices["head_choices"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"hidden_choices": [48, 32, 64]}, "hidden_choices must be strictly increasing"),
        ({"mlp_choices": [64, 256]}, "mlp_choices must end with the parent's intermediate_size=128"),
        ({"depth_choices": [2, 4, 6]}, "depth_choices must end with the parent's num_hidden_layers=4"),
        ({"head_choices": [3, 8]}, r"head_choices \[3\] are not multiples of num_key_value_heads=2.*\[2, 4, 6, 8\]"),
        ({"budgets": [0.5, 1.2]}, r"budgets \[1.2\] are outside \(0, 1\]"),
        ({"layer_ranking": [0, 1, 1, 3]}, "layer_ranking must be a permutation of 0..3"),
        ({"budget": 0.01}, r"cannot be reached.*allowed budgets are \[0\.\d+, 1\]"),
        ({"budget": "lots"}, "is not a number"),
        ({"budget_tolerance": 1.5}, r"budget_tolerance must be in \[0, 1\)"),
    ],
)
def test_invalid_configs_are_refused(options, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        flex_config(**options)


def test_non_llama_parent_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="Llama-shaped parent"):
        LlamaFlexConfig.from_llama_config(GPT2Config())


def test_parse_budget():
    assert parse_budget(0.5, 1000) == 0.5
    assert parse_budget("0.25", 1000) == 0.25
    assert parse_budget("500K", 1_000_000) == 0.5
    with pytest.raises(ValueError, match=r"budget '500' is outside \(0, 1\].*give a unit"):
        parse_budget("500", 1000)  # a plain number in a string is a fraction, as the number 500 is
    assert parse_budget("3B", 6_000_000_000) == 0.5
    assert parse_budget("350M", 700_000_000) == 0.5
    with pytest.raises(ValueError, match="not a number"):
        parse_budget("3 bananas", 1000)
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        parse_budget("2B", 1_000_000_000)


def test_closed_form_count_and_budget_loss():
    config = flex_config()
    parent = config.parent_parameters()
    # hand count for the tiny parent: 4 layers of (q 64·128 + k,v 2·64·32 + o 128·64 + mlp 3·64·128 + 2 norms) + final norm
    assert parent == 4 * (64 * 128 + 2 * 64 * 32 + 128 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert count_parameters(config, 32, 4, 32, 2) == 2 * (2 * 32 * 4 * 16 + 2 * 32 * 2 * 16 + 3 * 32 * 32 + 64) + 32
    assert 0 < smallest_budget(config) < 0.2
    full = {a: torch.nn.functional.one_hot(torch.tensor(len(c) - 1), len(c)).float() for a, c in config.choices.items()}
    assert budget_loss(config, full, 1.0).item() == 0.0
    assert budget_loss(config, full, 0.5).item() == pytest.approx(1.0 - config.budget_tolerance)
