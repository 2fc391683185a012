"""Architectures ranked by measured quality, exportable choices, and routers fitted to the one-shot family."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIG_ERRORS, tiny_llama
from transformers import LlamaConfig

from modeling_llamaflex import LlamaFlexConfig, LlamaFlexForCausalLM
from modeling_llamaflex.architecture import (
    candidates,
    count_parameters,
    make_architecture,
    scored_architectures,
    search_architecture,
)
from modeling_llamaflex.configuration_llamaflex import AXES
from modeling_llamaflex.slicing import sub_model_sizes
from modeling_llamaflex.search import ROUTER_FIT_POINTS, router_fit_family


def calibration(n: int = 8, length: int = 16, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(3, 128, (n, length))


def mlp_only_budget(config: LlamaFlexConfig, mlp: int) -> float:
    full = config.parent_parameters()
    return count_parameters(config, config.hidden_size, config.num_attention_heads, mlp, config.num_hidden_layers) / full


def test_harmless_axis_is_the_one_cut_and_the_cut_is_loss_free(input_ids):
    """Half of every layer's MLP neurons are dead (zero up_proj rows, scattered): the one-shot sub-model at the
    size of that cut must cut exactly them, and give the parent's logits."""
    llama = tiny_llama()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in llama.model.layers:
            dead = torch.randperm(128)[:64]
            layer.mlp.up_proj.weight[dead] = 0
    # MLP choices in eighths: with sixteenths, 72 neurons (the 64 live ones and 8 dead) is as loss-free as 64
    flex = LlamaFlexForCausalLM.from_llama(llama, calibration(), progress=False, budgets=[0.7],
                                           mlp_choices=[32, 48, 64, 80, 96, 112, 128])
    budget = mlp_only_budget(flex.config, 64)
    assert len(candidates(flex.config, budget)) > 1  # other cuts of the same size exist
    arch = flex.architecture(budget)
    assert (arch.hidden, arch.heads, arch.mlp, arch.depth) == (64, 8, 64, 4), arch
    assert arch.note.startswith("one-shot") and "measured" in arch.note
    torch.testing.assert_close(flex(input_ids, budget=budget).logits, llama(input_ids).logits, atol=1e-5, rtol=0)


def test_scores_travel_with_the_checkpoint(tmp_path):
    """architecture(b) after loading needs no data: the measured scores are in config.json."""
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama(), calibration(), progress=False)
    scores = flex.config.architecture_scores
    assert scores["metric"] == "kl_to_parent" and scores["scored"] and set(scores["axis_costs"]) == set(AXES)
    assert flex.config.hidden_norm_gains is None  # off by default
    before = {b: flex.architecture(b).to_dict() for b in (0.5, 0.6, 0.75, 0.9)}
    flex.save_pretrained(tmp_path)
    loaded = LlamaFlexForCausalLM.from_pretrained(tmp_path)
    assert {b: loaded.architecture(b).to_dict() for b in before} == before


def test_quality_search_picks_the_lowest_measured_loss():
    """The chosen candidate has the lowest measured loss among those scored within tolerance or below it, and
    over a grid of budgets a larger budget never gets a higher score (the family is monotone)."""
    grid = torch.linspace(0.3, 0.95, 14).tolist()
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama(), calibration(), progress=False, top_k=50, score_budgets=grid)
    config = flex.config
    scored = config.architecture_scores["scored"]
    parent = config.parent_parameters()
    chosen_scores = []
    for budget in grid:
        chosen, note = search_architecture(config, budget)
        key = ",".join(str(chosen[a]) for a in AXES)
        allowed = [loss for idx, params, loss in scored_architectures(config)
                   if params <= budget * parent * (1 + config.budget_tolerance)]
        assert scored[key] == min(allowed), (budget, note)
        chosen_scores.append(scored[key])
    assert all(b <= a for a, b in zip(chosen_scores, chosen_scores[1:])), chosen_scores


def test_untrained_routers_do_not_choose_but_are_fitted_to_the_family():
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama(), calibration(), progress=False)
    config = flex.config
    assert int(flex.model.router.trained_steps) == 0
    assert all(flex.architecture(b).note.startswith("one-shot (untrained routers)") for b in config.budgets)
    one_shot = {b: make_architecture(config, search_architecture(config, b, allow_smaller=False)[0])
                for b in config.budgets}
    flex.model.router.trained_steps.fill_(1)  # as after training: the routers' own argmax now chooses
    for b, arch in one_shot.items():
        routed = flex.architecture(b)
        assert routed.note == "router" and routed.indices == arch.indices, (b, routed, arch)


def test_routers_are_fitted_between_trained_budgets_too():
    """Conversion fits the routers at ROUTER_FIT_POINTS (161) budgets from the smallest trained one to 1 as well:
    their own argmax is the search's best within tolerance at each, and on budget more often at budgets fitted
    nowhere (midway between those of a 41-point fit) than routers fitted at the trained budgets only, which are a
    step function between them."""
    between = [0.5 + 0.5 * (i + 0.5) / 40 for i in range(40)]
    on_budget = {}
    for points in (0, ROUTER_FIT_POINTS):
        flex = LlamaFlexForCausalLM.from_llama(tiny_llama(), calibration(), progress=False, router_fit_points=points)
        family = router_fit_family(flex.config, points)
        flex.model.router.trained_steps.fill_(1)
        for b, indices in family.items():
            assert flex.architecture(b).indices == indices, (points, b)
        on_budget[points] = sum(flex.architecture(b).note == "router" for b in between)
    assert len(family) == 160 and set(flex.config.budgets) - {1.0} <= set(family)  # 0.5, 0.503125, ..., 0.996875
    assert on_budget[ROUTER_FIT_POINTS] > on_budget[0], on_budget


@pytest.mark.parametrize("heads, kv, hidden", [(8, 2, 64), (9, 3, 72), (6, 2, 48)])
def test_every_routed_pick_is_exportable(heads, kv, hidden):
    """With scrambled router weights, every argmax and every hard sample over a grid of budgets is a valid
    plain LlamaConfig (transformers refuses hidden_size % num_attention_heads != 0)."""
    llama = tiny_llama(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=hidden, head_dim=16)
    flex = LlamaFlexForCausalLM.from_llama(llama)
    flex.model.router.trained_steps.fill_(1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flex.model.router.parameters():
            p.normal_(0, 2.0)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for budget in torch.linspace(0.3, 1.0, 15).tolist():
        try:
            arch = flex.architecture(budget)
        except ValueError:
            continue  # below the smallest reachable budget
        picks = [arch.indices]
        for _ in range(5):
            probs = flex.route(budget, mode="hard", generator=generator).probs
            picks.append({a: int(probs[a].argmax()) for a in AXES})
        for indices in picks:
            sub = make_architecture(flex.config, indices)
            flex.config.to_llama_config(**sub_model_sizes(sub))  # raises if transformers refuses it
            seen.add((sub.hidden, sub.heads))
    assert len(seen) > 1


def test_invalid_explicit_choices_are_refused_naming_them():
    parent = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    with pytest.raises(CONFIG_ERRORS, match=r"hidden 64 with 6 heads.*multiple of num_attention_heads"):
        LlamaFlexConfig.from_llama_config(parent, head_choices=[4, 6, 8])
    with pytest.raises(CONFIG_ERRORS, match=r"hidden 36 with 8 heads"):
        LlamaFlexConfig.from_llama_config(parent, hidden_choices=[36, 64])


def test_dead_hidden_channels_are_cut_loss_free_thanks_to_the_norm_gains(input_ids):
    """16 of the 64 residual channels carry nothing (zero embedding columns, zero o_proj/down_proj rows): the
    hidden-48 sub-model computes the same as the parent except that its RMSNorms divide by the RMS of 48
    channels, sqrt(64/48) times larger (exactly so with a negligible epsilon). Conversion measures that gain;
    the cut is then loss-free, sliced and exported, and it is not without the gains."""
    llama = tiny_llama(rms_norm_eps=1e-12)
    torch.manual_seed(1)
    dead = torch.randperm(64)[:16]
    with torch.no_grad():
        llama.model.embed_tokens.weight[:, dead] = 0
        for layer in llama.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    flex = LlamaFlexForCausalLM.from_llama(llama, calibration(), progress=False, hidden_choices=[32, 48, 64], top_k=0,
                                                norm_correction=True)
    config = flex.config
    gains = torch.tensor(config.hidden_norm_gains)
    torch.testing.assert_close(gains[1], torch.full((9,), (64 / 48) ** 0.5, dtype=torch.float32), atol=1e-4, rtol=0)
    assert torch.all(gains[2] == 1.0)
    full = {a: len(config.choices[a]) - 1 for a in AXES}
    arch = make_architecture(config, dict(full, hidden=1))
    expected = llama(input_ids).logits
    torch.testing.assert_close(flex(input_ids, architecture=arch).logits, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(flex.extract(arch)(input_ids).logits, expected, atol=1e-4, rtol=0)
    config.hidden_norm_gains = None
    assert not torch.allclose(flex(input_ids, architecture=arch).logits, expected, atol=1e-2)
