"""Exactness of the elastic model against independent references (plain transformers Llama models)."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, elastic, non_embedding_parameters, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_llamaflex import LlamaFlexConfig, LlamaFlexForCausalLM, budget_loss, expected_parameters
from modeling_llamaflex.architecture import make_architecture, search_architecture
from modeling_llamaflex.configuration_llamaflex import AXES
from modeling_llamaflex.elastic import Policy

# every axis below its full size somewhere; heads=4 keeps 2 of 4 query heads in each of the 2 KV groups
ARCHITECTURES = [
    {"hidden": 0, "heads": 0, "mlp": 0, "depth": 0},
    {"hidden": 2, "heads": 1, "mlp": 3, "depth": 1},
    {"hidden": 4, "heads": 0, "mlp": 6, "depth": 2},
    {"hidden": 3, "heads": 1, "mlp": 5, "depth": 2},
]


@pytest.mark.parametrize("tied", [False, True])
def test_full_budget_gives_the_parents_logits(tied, input_ids):
    llama = tiny_llama(tie_word_embeddings=tied)
    flex = LlamaFlexForCausalLM.from_llama(llama)
    expected = llama(input_ids).logits
    torch.testing.assert_close(flex(input_ids).logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(flex(input_ids, budget=1.0).logits, expected, atol=ATOL, rtol=0)
    assert flex.architecture(1.0).num_parameters == non_embedding_parameters(llama)


@pytest.mark.parametrize("indices", ARCHITECTURES)
def test_sliced_masked_and_extracted_agree(llama, input_ids, indices):
    flex = elastic(llama)
    arch = make_architecture(flex.config, indices)
    sub = flex.extract(arch)
    reference = sub(input_ids).logits
    sliced = flex(input_ids, policy=Policy.one_hot(flex.config, indices, sliced=True)).logits
    masked = flex(input_ids, policy=Policy.one_hot(flex.config, indices, sliced=False)).logits
    torch.testing.assert_close(sliced, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(masked, reference, atol=ATOL, rtol=0)
    # the extracted model is really that size, in HF's group-major head order
    assert sub.config.model_type == "llama"
    assert sub.config.num_attention_heads == arch.heads and sub.config.num_key_value_heads == 2
    assert non_embedding_parameters(sub) == arch.num_parameters
    one_hot = Policy.one_hot(flex.config, indices).probs
    assert expected_parameters(flex.config, one_hot).item() == pytest.approx(arch.num_parameters, rel=1e-6)


def test_modulation_is_not_a_no_op(llama, input_ids):
    """A sanity check of the test above: the random modulation changes the outputs, so folding matters."""
    flex = elastic(llama)
    indices = ARCHITECTURES[1]
    with_mod = flex(input_ids, policy=Policy.one_hot(flex.config, indices)).logits
    flex.model.modulation = None
    without = flex(input_ids, policy=Policy.one_hot(flex.config, indices)).logits
    assert (with_mod - without).abs().max() > 1e-3


@pytest.mark.parametrize("budget", [0.4, 0.6, 0.8])
def test_budget_forward_extract_and_generation(llama, input_ids, budget):
    flex = elastic(llama)
    arch = flex.architecture(budget)
    assert abs(arch.num_parameters / arch.target_parameters - 1) <= flex.config.budget_tolerance
    sub = flex.extract(budget)
    torch.testing.assert_close(flex(input_ids, budget=budget).logits, sub(input_ids).logits, atol=ATOL, rtol=0)
    assert non_embedding_parameters(sub) == arch.num_parameters
    prompt = input_ids[:1, :5]
    ours = flex.generate(prompt, budget=budget, max_new_tokens=10, do_sample=False)
    theirs = sub.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)


def test_generate_at_a_budget_runs_the_routers_once(llama, input_ids):
    flex = elastic(llama)
    calls = []
    flex.model.router.register_forward_hook(lambda module, args, out: calls.append(float(args[0])))
    flex.generate(input_ids[:1, :5], budget=0.6, max_new_tokens=6, do_sample=False)
    assert calls == [pytest.approx(0.6)]  # once per call, not once per decoding step


def test_hidden_states_and_attentions_of_a_sub_model_are_the_extracted_models(llama, input_ids):
    """`output_hidden_states` / `output_attentions` of a sub-model give the extracted Llama's, layer for layer."""
    flex = elastic(llama)
    flex.config._attn_implementation = "eager"
    arch = make_architecture(flex.config, ARCHITECTURES[1])  # 3 of the 4 layers
    sub = flex.extract(arch)
    sub.config._attn_implementation = "eager"
    ours = flex(input_ids, architecture=arch, output_hidden_states=True, output_attentions=True)
    theirs = sub(input_ids, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == sub.config.num_hidden_layers + 1 < flex.config.num_hidden_layers + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert len(ours.attentions) == arch.depth == 3
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_budget_as_absolute_size(llama):
    flex = elastic(llama)
    parent = flex.config.parent_parameters()
    assert flex.architecture(f"{parent * 0.6 / 1e3:.3f}K").budget == pytest.approx(0.6, rel=1e-3)


def test_architecture_falls_back_when_the_router_overshoots(llama):
    flex = elastic(llama)
    with torch.no_grad():  # routers that always pick the full model
        for head in flex.model.router.heads.values():
            head[-1].weight.zero_()
            head[-1].bias.copy_(torch.arange(head[-1].bias.numel(), dtype=torch.float32) * 10)
    flex.model.router.trained_steps.fill_(1)  # trained routers choose; untrained ones never do
    arch = flex.architecture(0.5)
    assert "missed the budget" in arch.note and "within" in arch.note
    assert abs(arch.num_parameters / arch.target_parameters - 1) <= flex.config.budget_tolerance


def test_gradients_reach_routers_and_modulation(llama, input_ids):
    flex = elastic(llama).train()
    generator = torch.Generator().manual_seed(0)
    for mode in ("soft", "hard"):
        flex.zero_grad()
        policy = flex.route(0.6, mode=mode, generator=generator)
        assert policy.sliced == (mode == "hard")
        loss = flex(input_ids, labels=input_ids, policy=policy).loss
        loss.backward()
        for name in ("router", "modulation"):
            grads = [p.grad for p in getattr(flex.model, name).parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches {name} in {mode} mode"
    flex.zero_grad()
    policy = flex.route(0.3, mode="soft", generator=generator)
    loss = budget_loss(flex.config, policy.probs, 0.3)
    assert loss.item() > 0
    loss.backward()
    assert all(flex.model.router.heads[a][-1].weight.grad.abs().sum() > 0 for a in AXES)


def test_masked_norm_uses_the_expected_width():
    from modeling_llamaflex.elastic import ElasticRMSNorm, staircase

    torch.manual_seed(0)
    norm = ElasticRMSNorm(8, eps=0.0)
    probs = torch.tensor([0.25, 0.75])
    mask = staircase(probs, [4, 8], 8)
    assert torch.allclose(mask, torch.tensor([1.0] * 4 + [0.75] * 4))
    x = torch.randn(3, 8) * mask
    width = 0.25 * 4 + 0.75 * 8
    expected = x / torch.sqrt((x**2).sum(-1, keepdim=True) / width)
    torch.testing.assert_close(norm(x, torch.tensor(8 / width)), expected)


def prune_by_hand(llama: LlamaForCausalLM, hidden: int, heads_per_group: int, mlp: int, layers: list[int]) -> LlamaForCausalLM:
    """The parent pruned with plain tensor indexing, not through modeling_llamaflex: the first `hidden` residual
    channels, the first `heads_per_group` query heads of every KV group, the first `mlp` neurons, `layers`."""
    cfg = llama.config
    d, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    group = nq // nkv
    q_rows = torch.cat([torch.arange(d) + (g * group + j) * d for g in range(nkv) for j in range(heads_per_group)])
    src = llama.state_dict()
    sub = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "hidden_size": hidden, "intermediate_size": mlp,
                                          "num_hidden_layers": len(layers), "num_attention_heads": nkv * heads_per_group}))
    state = {"model.embed_tokens.weight": src["model.embed_tokens.weight"][:, :hidden],
             "model.norm.weight": src["model.norm.weight"][:hidden]}
    if "lm_head.weight" in sub.state_dict():
        state["lm_head.weight"] = src["lm_head.weight"][:, :hidden]
    for new, old in enumerate(layers):
        a, b = f"model.layers.{old}.", f"model.layers.{new}."
        state[b + "input_layernorm.weight"] = src[a + "input_layernorm.weight"][:hidden]
        state[b + "post_attention_layernorm.weight"] = src[a + "post_attention_layernorm.weight"][:hidden]
        state[b + "self_attn.q_proj.weight"] = src[a + "self_attn.q_proj.weight"][q_rows, :hidden]
        state[b + "self_attn.k_proj.weight"] = src[a + "self_attn.k_proj.weight"][:, :hidden]
        state[b + "self_attn.v_proj.weight"] = src[a + "self_attn.v_proj.weight"][:, :hidden]
        state[b + "self_attn.o_proj.weight"] = src[a + "self_attn.o_proj.weight"][:hidden, q_rows]
        state[b + "mlp.gate_proj.weight"] = src[a + "mlp.gate_proj.weight"][:mlp, :hidden]
        state[b + "mlp.up_proj.weight"] = src[a + "mlp.up_proj.weight"][:mlp, :hidden]
        state[b + "mlp.down_proj.weight"] = src[a + "mlp.down_proj.weight"][:hidden, :mlp]
    sub.load_state_dict(state, strict=True)
    return sub.eval()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.75])
def test_a_fresh_sub_model_is_the_parent_pruned_by_hand(tied, budget, input_ids):
    """Before training (zero-initialised modulation, no calibration so no reordering), `extract(b)` and the sliced
    forward at b equal the parent pruned by hand to the same choices."""
    llama = tiny_llama(tie_word_embeddings=tied)
    flex = LlamaFlexForCausalLM.from_llama(llama, layer_ranking=[2, 0, 3, 1])
    arch = flex.architecture(budget)
    assert arch.num_parameters < non_embedding_parameters(llama)  # a real cut
    kept = sorted([2, 0, 3, 1][: arch.depth])  # the first `depth` layers of the ranking, in network order
    assert list(arch.kept_layers) == kept
    by_hand = prune_by_hand(llama, arch.hidden, arch.heads // llama.config.num_key_value_heads, arch.mlp, kept)
    expected = by_hand(input_ids).logits
    sub = flex.extract(budget)
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert {k: getattr(sub.config, k) for k in shape} == {k: getattr(by_hand.config, k) for k in shape}
    assert non_embedding_parameters(sub) == non_embedding_parameters(by_hand) == arch.num_parameters
    torch.testing.assert_close(sub(input_ids).logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(flex(input_ids, budget=budget).logits, expected, atol=ATOL, rtol=0)


def test_llama31_8b_on_meta_device():
    import json
    import os

    from transformers import LlamaConfig

    path = os.path.join(os.path.dirname(__file__), "..", "training", "configs", "llama31_8b_parent.json")
    with open(path) as fh:
        parent = LlamaConfig(**{k: v for k, v in json.load(fh).items() if k != "model_type"})
    config = LlamaFlexConfig.from_llama_config(parent)
    with torch.device("meta"):
        flex = LlamaFlexForCausalLM(config)
    layers = sum(p.numel() for n, p in flex.named_parameters() if n.startswith("model.layers.") or n == "model.norm.weight")
    mlp = sum(p.numel() for n, p in flex.named_parameters() if ".mlp." in n)
    assert layers == config.parent_parameters()
    assert round(layers / 1e9, 2) == 6.98
    assert round(mlp / 1e9, 2) == 5.64
    router = sum(p.numel() for p in flex.model.router.parameters())
    modulation = sum(p.numel() for p in flex.model.modulation.parameters())
    assert router < 1e6 and modulation < 1e6
    for budget in config.budgets:  # every trained budget is reachable within tolerance
        indices, note = search_architecture(config, budget)
        arch = make_architecture(config, indices)
        assert "within" in note and abs(arch.num_parameters / (budget * layers) - 1) <= config.budget_tolerance


def test_modulation_leaves_the_full_model_alone(llama, input_ids):
    """A trained (random, non-zero) modulation changes the sub-models but never the full model: the parent."""
    flex = elastic(llama)
    full = {a: len(flex.config.choices[a]) - 1 for a in AXES}
    smaller = flex.model.modulation(Policy.one_hot(flex.config, {**full, "mlp": full["mlp"] // 2}).probs)
    assert (smaller - 1).abs().max() > 1e-2  # the modulation is live below the full choice
    logits = flex(input_ids, policy=Policy.one_hot(flex.config, full, sliced=False)).logits
    torch.testing.assert_close(logits, llama(input_ids).logits, atol=ATOL, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients(llama, input_ids):
    flex = elastic(llama).train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            flex.gradient_checkpointing_enable()
        flex.zero_grad()
        policy = flex.route(0.6, mode="hard", generator=torch.Generator().manual_seed(0))
        flex(input_ids, labels=input_ids, policy=policy).loss.backward()
        grads.append({n: p.grad.clone() for n, p in flex.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_norm_gains_are_the_same_sliced_masked_extracted_and_loaded_at_a_budget(llama, input_ids, tmp_path):
    """Random RMSNorm gains per hidden width (as conversion measures them): the sliced, the masked one-hot and
    the extracted sub-model agree, so do the model loaded at its budget from files; the full model is untouched."""
    flex = elastic(llama)
    config = flex.config
    norms = 2 * config.num_hidden_layers + 1
    torch.manual_seed(7)
    config.hidden_norm_gains = [(1 + 0.3 * torch.rand(norms)).tolist() for _ in config.hidden_choices[:-1]]
    config.hidden_norm_gains.append([1.0] * norms)
    indices = ARCHITECTURES[1]
    arch = make_architecture(config, indices)
    reference = flex.extract(arch)(input_ids).logits
    sliced = flex(input_ids, policy=Policy.one_hot(config, indices, sliced=True)).logits
    masked = flex(input_ids, policy=Policy.one_hot(config, indices, sliced=False)).logits
    torch.testing.assert_close(sliced, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(masked, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(flex(input_ids, architecture=arch).logits, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(flex(input_ids).logits, llama(input_ids).logits, atol=ATOL, rtol=0)
    budget = 0.5
    assert flex.architecture(budget).hidden < config.hidden_size
    flex.save_pretrained(tmp_path)
    loaded = LlamaFlexForCausalLM.from_pretrained(tmp_path, budget=budget)
    torch.testing.assert_close(loaded(input_ids).logits, flex.extract(budget)(input_ids).logits, atol=ATOL, rtol=0)
    config.hidden_norm_gains[indices["hidden"]] = [1.0] * norms  # the gains matter: without them it differs
    assert not torch.allclose(flex(input_ids, architecture=arch).logits, reference, atol=1e-3)
