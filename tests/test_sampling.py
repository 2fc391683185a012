"""Issue 12's training options: the sandwich rule, exported hard samples, routers between budgets, one-hot router input."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIG_ERRORS, arguments, dataset, tiny_llama

from modeling_llamaflex import LlamaFlexForCausalLM
from modeling_llamaflex.router import BudgetRouter, budget_blend
from training.trainer import INTERPOLATED, BudgetSampler, FlexTrainer


def record_forward_kwargs(model) -> list[dict]:
    """Wrap `model.forward`; the returned list gets the keyword arguments of every call."""
    calls, original = [], model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    model.forward = spy
    return calls


def test_sandwich_draws_largest_smallest_and_a_random_other_every_step():
    budgets = [0.5, 0.625, 0.75, 0.875]
    sampler = BudgetSampler(budgets, None, 0.9, seed=3, rule="sandwich")
    others = set()
    for step in range(40):
        draws = [sampler.sample(step, micro, 0.0)[0] for micro in range(3)]
        assert draws[0] == 1.0 and draws[1] == 0.5 and draws[2] in budgets[1:]
        others.add(draws[2])
        # deterministic in (seed, step, micro-step): a second sampler (another rank, a resumed run) agrees
        assert draws == [BudgetSampler(budgets, None, 0.9, seed=3, rule="sandwich").sample(step, m, 0.0)[0] for m in range(3)]
    assert others == set(budgets[1:])
    with pytest.raises(ValueError, match="sampling_rule"):
        BudgetSampler(budgets, None, 0.2, 0, rule="bogus")


def test_onehot_blend_at_a_midpoint_is_the_average_of_the_neighbours():
    anchors = [0.5, 0.625, 0.75, 1.0]
    one = lambda b: budget_blend(torch.tensor(b), anchors)
    torch.testing.assert_close(one(0.5), torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(one(0.6875), (one(0.625) + one(0.75)) / 2)
    torch.testing.assert_close(one(0.875), (one(0.75) + one(1.0)) / 2)
    torch.testing.assert_close(one(0.3), one(0.5))  # below the smallest: its one-hot
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama(), budgets=[0.5, 0.75], router_budget_embedding="onehot")
    router = flex.model.router
    assert isinstance(router, BudgetRouter) and router.embed.in_features == 3  # 0.5, 0.75 and 1
    assert set(router(torch.tensor(0.6))) == {"hidden", "heads", "mlp", "depth"}
    with pytest.raises(CONFIG_ERRORS, match="router_budget_embedding"):
        LlamaFlexForCausalLM.from_llama(tiny_llama(), router_budget_embedding="cosine")


def test_exported_hard_samples_train_the_exported_sub_model(tmp_path):
    parent = tiny_llama()
    flex = LlamaFlexForCausalLM.from_llama(parent, budgets=[0.5, 0.75])
    calls = record_forward_kwargs(flex)
    args = arguments(tmp_path, hard_sample_probability=1.0, hard_samples="exported", full_budget_probability=0.0,
                     router_budget_samples=2, router_learning_rate=1e-2, max_steps=4,
                     remove_unused_columns=False)
    trainer = FlexTrainer(model=flex, args=args, teacher_model=parent, train_dataset=dataset())
    exported_before = {b: flex.architecture(b).indices for b in (0.5, 0.75)}
    router_before = {n: p.detach().clone() for n, p in flex.model.router.named_parameters()}
    trainer.train()
    seen = [(call.get("architecture"), call.get("route_mode")) for call in calls]
    assert seen and all(arch is not None and mode is None for arch, mode in seen)
    assert all(hard and budget < 1 for _, _, budget, hard in trainer.sample_log)
    first = trainer.sample_log[0][2]
    assert seen[0][0].indices == exported_before[first]  # step 0 trains what architecture(b) exported then
    # the routers still learn (budget loss of their soft policy at the trained and at random budgets)
    assert any(not torch.equal(p.detach(), router_before[n]) for n, p in flex.model.router.named_parameters())
    assert int(flex.model.router.trained_steps) == 4


def test_router_budget_samples_add_the_budget_loss_between_trained_budgets(tmp_path):
    parent = tiny_llama()
    flex = LlamaFlexForCausalLM.from_llama(parent, budgets=[0.5, 0.75])
    args = arguments(tmp_path, hard_sample_probability=0.0, full_budget_probability=0.0, router_budget_samples=3,
                     router_learning_rate=1e-2, max_steps=2)
    trainer = FlexTrainer(model=flex, args=args, teacher_model=parent, train_dataset=dataset())
    asked = []
    original = trainer._router_budget_loss

    def spy(budget, generator):
        asked.append(budget)
        return original(budget, generator)

    trainer._router_budget_loss = spy
    trainer.train()
    routed = [entry for entry in trainer.sample_log if entry[2] < 1]
    assert routed and len(asked) == 3 * len(routed)  # three extra budgets per routed forward, none without one
    assert all(0.5 <= b <= 1.0 for b in asked) and len(set(asked)) == len(asked)


def test_new_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sampling_rule"):
        arguments(tmp_path, sampling_rule="bigger-first")
    with pytest.raises(ValueError, match="hard_samples"):
        arguments(tmp_path, hard_samples="sometimes")
    with pytest.raises(ValueError, match="interpolated_budget_probability"):
        arguments(tmp_path, interpolated_budget_probability=1.5)


def test_interpolated_budgets_replace_that_share_of_the_sub_model_draws():
    budgets = [0.5, 0.75]
    plain = BudgetSampler(budgets, None, 0.25, seed=5)
    mixed = BudgetSampler(budgets, None, 0.25, seed=5, interpolate=0.5)
    draws = [(plain.sample(step, 0, 0.3)[:2], mixed.sample(step, 0, 0.3)[:2]) for step in range(2000)]
    # the full model and the hard/soft draw are untouched: only a budget below 1 may move
    assert all((a == 1.0) == (b == 1.0) and ha == hb for (a, ha), (b, hb) in draws)
    moved = [b for (a, _), (b, _) in draws if a < 1.0 and b not in budgets]
    subs = sum(a < 1.0 for (a, _), _ in draws)
    assert abs(len(moved) / subs - 0.5) < 0.05 and all(0.5 <= b < 1.0 for b in moved)
    assert abs(sum(moved) / len(moved) - 0.75) < 0.02  # uniform between the smallest trained budget and 1
    assert [mixed.bucket(b) for b in (0.5, 0.75, 1.0, moved[0])] == [0.5, 0.75, 1.0, INTERPOLATED]
    with pytest.raises(ValueError, match="interpolated_budget_probability"):
        BudgetSampler(budgets, None, 0.2, 0, interpolate=-0.1)


def test_interpolated_budgets_train_their_exported_sub_models_and_are_counted_apart(tmp_path):
    parent = tiny_llama()
    flex = LlamaFlexForCausalLM.from_llama(parent, budgets=[0.5, 0.75])
    calls = record_forward_kwargs(flex)
    args = arguments(tmp_path, hard_sample_probability=1.0, hard_samples="exported", full_budget_probability=0.0,
                     interpolated_budget_probability=1.0, router_learning_rate=0.0, max_steps=4, logging_steps=2,
                     remove_unused_columns=False)
    trainer = FlexTrainer(model=flex, args=args, teacher_model=parent, train_dataset=dataset())
    trainer.train()
    drawn = [budget for _, _, budget, _ in trainer.sample_log]
    assert len(drawn) == 4 and all(0.5 < b < 1.0 and b not in (0.5, 0.75) for b in drawn)
    # each step trained exactly what architecture(b) exports at its (untrained) budget
    assert [call["architecture"].indices for call in calls] == [flex.architecture(b).indices for b in drawn]
    assert set(trainer.tokens_per_budget) == {INTERPOLATED}
    assert any(f"{INTERPOLATED}/loss" in entry for entry in trainer.state.log_history)
