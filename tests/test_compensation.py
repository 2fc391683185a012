"""Least-squares compensation of extracted sub-models (modeling_llamaflex.compensation), against references
computed here by hand: the parent's own activations and torch.linalg.lstsq."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL, tiny_llama

from modeling_llamaflex import Compensation, LlamaFlexForCausalLM
from modeling_llamaflex.compensation import MIN_TOKENS_PER_INPUT
from modeling_llamaflex.architecture import candidates, full_architecture, index_key, make_architecture


def calibration(n: int = 16, length: int = 24) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randint(3, 128, (n, length))


@torch.no_grad()
def projection_inputs(llama, data, which: str) -> list[torch.Tensor]:
    """(tokens, inputs) per layer: what the parent's down_proj ("mlp") or o_proj ("heads") reads on `data`."""
    seen = [[] for _ in llama.model.layers]
    hooks = []
    for l, layer in enumerate(llama.model.layers):
        module = layer.mlp.down_proj if which == "mlp" else layer.self_attn.o_proj
        hooks.append(module.register_forward_pre_hook(lambda m, args, l=l: seen[l].append(args[0].reshape(-1, args[0].shape[-1]))))
    llama(input_ids=data)
    for hook in hooks:
        hook.remove()
    return [torch.cat(s).double() for s in seen]


def only(config, axis: str, index: int):
    """The architecture that cuts `axis` to its choice `index` and keeps everything else whole."""
    indices = {a: len(config.choices[a]) - 1 for a in config.choices}
    return make_architecture(config, {**indices, axis: index})


@pytest.mark.parametrize("axis, which, name", [("mlp", "mlp", "mlp.down_proj"), ("heads", "heads", "self_attn.o_proj")])
def test_a_cut_projection_is_refitted_to_the_full_outputs_by_least_squares(axis, which, name):
    """Cutting only the MLP (only the heads), the compensated sub-model's down_proj (o_proj) is the least-squares
    solution, on the parent's own activations, of reproducing the full projection's output from the kept inputs."""
    llama = tiny_llama()
    flex = LlamaFlexForCausalLM.from_llama(llama)  # no calibration: the parent's own unit order
    data = calibration()
    arch = only(flex.config, axis, 0)
    compensation = Compensation.from_data(flex, data, batch_size=4, progress=False, ridge=0.0)
    sub = flex.extract(arch, compensation=compensation)
    plain = flex.extract(arch)
    n_kv, d = llama.config.num_key_value_heads, llama.config.head_dim
    if axis == "mlp":
        kept = torch.arange(arch.mlp)
    else:
        per_group = (llama.config.num_attention_heads // n_kv) * d
        kept = torch.cat([torch.arange(g * per_group, g * per_group + (arch.heads // n_kv) * d) for g in range(n_kv)])
    for l, inputs in enumerate(projection_inputs(llama, data, which)):
        full = llama.get_submodule(f"model.layers.{l}.{name}").weight.detach().double()
        expected = torch.linalg.lstsq(inputs[:, kept], inputs @ full.T).solution.T
        got = sub.get_submodule(f"model.layers.{l}.{name}").weight.detach().double()
        # the fitted outputs are unique even where the weights are not (heads of a KV group share their values)
        scale = float((inputs @ full.T).abs().max())
        torch.testing.assert_close(inputs[:, kept] @ got.T, inputs[:, kept] @ expected.T, atol=1e-3 * scale, rtol=0)
        # and it is a real change: the plain slice reproduces the full output worse on the same tokens
        plain_weight = plain.get_submodule(f"model.layers.{l}.{name}").weight.detach().double()
        error = lambda w: (inputs[:, kept] @ w.T - inputs @ full.T).pow(2).sum()  # noqa: E731
        assert error(got) < 0.9 * error(plain_weight)


def test_compensated_sub_models_are_closer_to_the_parent():
    """On the calibration tokens, a compensated MLP cut and a compensated head cut are closer to the parent (KL)
    than the plain slices, and the full architecture is left exactly the parent."""
    llama = tiny_llama()
    flex = LlamaFlexForCausalLM.from_llama(llama)
    data = calibration()
    compensation = Compensation.from_data(flex, data, batch_size=4, progress=False)
    with torch.no_grad():
        reference = F.log_softmax(llama(input_ids=data).logits, -1)

        def kl(model) -> float:
            return float(F.kl_div(F.log_softmax(model(input_ids=data).logits, -1), reference, log_target=True,
                                  reduction="batchmean"))

        for axis in ("mlp", "heads"):
            arch = only(flex.config, axis, 0)
            assert kl(flex.extract(arch, compensation=compensation)) < kl(flex.extract(arch))
        full = flex.extract(full_architecture(flex.config), compensation=compensation)
        torch.testing.assert_close(full(input_ids=data).logits, llama(input_ids=data).logits, atol=ATOL, rtol=0)


def test_compensation_warns_when_its_statistics_hold_few_tokens(caplog):
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama())
    width = max(flex.config.intermediate_size, flex.config.num_attention_heads * flex.config.head_dim)
    enough = MIN_TOKENS_PER_INPUT * width
    with caplog.at_level("WARNING", logger="modeling_llamaflex.compensation"):
        Compensation.from_data(flex, torch.randint(3, 128, (enough // 64 - 1, 64)), progress=False)
    assert f"the least-squares fit is better with at least {enough}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_llamaflex.compensation"):
        Compensation.from_data(flex, torch.randint(3, 128, (enough // 64, 64)), progress=False)
    assert "least-squares" not in caplog.text


def test_compensation_refuses_bad_input():
    llama = tiny_llama()
    flex = LlamaFlexForCausalLM.from_llama(llama)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        Compensation.from_data(flex, calibration(2), progress=False, ridge=-1.0)
    with pytest.raises(ValueError, match="calibration data is empty"):
        Compensation.from_data(flex, [], progress=False)


def test_scoring_compensated_candidates_slices_what_extract_cuts_and_restores_the_weights(input_ids):
    """`Compensation.applied` (the sliced forward that scoring measures) gives the logits of the compensated
    extracted plain Llama; the model's weights and its own scores are unchanged afterwards; after `score`,
    `extract(b, compensation=...)` cuts the best compensated candidate, and its note says so."""
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama(), calibration(), top_k=4, budgets=[0.5, 0.75])
    before = {k: v.clone() for k, v in flex.state_dict().items()}
    own_scores = dict(flex.config.architecture_scores["scored"])
    compensation = Compensation.from_data(flex, calibration(), batch_size=4, progress=False)
    arch = flex.architecture(0.5)
    with torch.no_grad(), compensation.applied(flex, arch):
        sliced = flex(input_ids, architecture=arch).logits
    torch.testing.assert_close(sliced, flex.extract(arch, compensation=compensation)(input_ids).logits, atol=ATOL, rtol=0)
    assert not torch.allclose(sliced, flex(input_ids, architecture=arch).logits, atol=1e-3)
    for name, value in flex.state_dict().items():
        assert torch.equal(value, before[name]), name

    scores = compensation.score(flex, calibration()[-4:], budgets=[0.5, 0.75], top_k=4, progress=False)
    assert scores["metric"] == "kl_to_parent (compensated)"
    assert flex.config.architecture_scores["scored"] == own_scores
    for name, value in flex.state_dict().items():
        assert torch.equal(value, before[name]), name
    for budget in (0.5, 0.75):
        chosen = compensation.architecture(flex, budget)
        assert chosen.note.startswith("compensated one-shot")
        within = [index_key(idx) for idx, _ in candidates(flex.config, budget)]
        best = min(scores["scored"][key] for key in within if key in scores["scored"])
        assert scores["scored"][index_key(chosen.indices)] <= best + 1e-12
        assert flex.extract(budget, compensation=compensation).config.intermediate_size == chosen.mlp
