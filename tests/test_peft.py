"""PEFT LoRA on the elastic model: one adapter sliced with the shared weights at every budget."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import arguments, dataset, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from modeling_llamaflex import Compensation, LlamaFlexForCausalLM, Policy, budget_loss
from modeling_llamaflex.lora import ElasticLoraLinear, add_lora, flex_model, load_lora
from modeling_llamaflex.lora import lora_config as elastic_lora_config
from training.trainer import FlexTrainer, parameter_group

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUDGETS = [0.3, 0.5, 0.75, 1.0]  # 0.3 keeps 4 of 8 query heads: a prefix within each KV group


def lora_config(**overrides) -> LoraConfig:
    # random B (init_lora_weights=False): the adapter changes the logits from the start
    values = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    values.update(overrides)
    return LoraConfig(**values)


def new_flex():
    return LlamaFlexForCausalLM.from_llama(tiny_llama(), budgets=[0.5, 0.75]).eval()


def flex_with_lora(seed: int = 0, **overrides):
    flex = new_flex()
    torch.manual_seed(seed)
    return add_lora(flex, lora_config(**overrides)).eval()


def test_the_helpers_give_elastic_lora_layers_and_plain_peft_is_refused(tmp_path):
    model = flex_with_lora()
    layers = [m for m in model.modules() if isinstance(m, ElasticLoraLinear)]
    assert len(layers) == 4 * len(TARGETS)
    ids = torch.randint(3, 128, (1, 6))
    expected = model(input_ids=ids, budget=0.5).logits
    # the config helper (PEFT's custom-module mapping) with PEFT's own entry point: the same layers and function
    values = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    flex = new_flex()
    torch.manual_seed(0)
    registered = get_peft_model(flex, elastic_lora_config(**values)).eval()
    assert sum(isinstance(m, ElasticLoraLinear) for m in registered.modules()) == len(layers)
    torch.testing.assert_close(registered(input_ids=ids, budget=0.5).logits, expected)
    # loading: load_lora gives the elastic layers back
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_lora(new_flex(), tmp_path / "adapter")
    assert sum(isinstance(m, ElasticLoraLinear) for m in loaded.modules()) == len(layers)
    torch.testing.assert_close(loaded(input_ids=ids, budget=0.5).logits, expected)
    # plain PEFT without the mapping would wrap the ElasticLinears in unsliceable layers: refused, naming the helpers
    with pytest.raises(TypeError, match=r"cannot be sliced.*add_lora.*load_lora.*lora_config"):
        get_peft_model(new_flex(), lora_config())
    with pytest.raises(TypeError, match=r"cannot be sliced.*load_lora"):
        PeftModel.from_pretrained(new_flex(), tmp_path / "adapter")
    # no process-wide hook: a plain Llama gets PEFT's plain layers
    assert not getattr(torch.nn.modules.module, "_global_module_registration_hooks", {})
    plain = get_peft_model(tiny_llama(), lora_config())
    assert not any(isinstance(m, ElasticLoraLinear) for m in plain.modules())


def test_concurrent_lora_forwards_at_different_budgets(input_ids):
    import threading

    model = flex_with_lora()
    with torch.no_grad():
        expected = {b: model(input_ids=input_ids, budget=b).logits for b in (0.3, 0.75)}
    errors: list[Exception] = []

    def work(b):
        try:
            with torch.no_grad():
                for _ in range(20):
                    torch.testing.assert_close(model(input_ids=input_ids, budget=b).logits, expected[b])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(b,)) for b in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_sliced_and_masked_logits_equal_the_merged_extracted_llama(input_ids):
    model = flex_with_lora()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).merge_and_unload()  # PEFT's own merge: a plain LlamaFlex model
    assert not any("lora" in n for n, _ in reference.named_parameters())
    flex = flex_model(model)
    assert min(flex.architecture(b).heads for b in BUDGETS) < flex.config.num_attention_heads
    for budget in BUDGETS:
        arch = flex.architecture(budget)
        expected = reference.extract(arch)(input_ids).logits  # an independent plain Llama
        sliced = model(input_ids=input_ids, budget=budget if budget < 1 else None).logits
        masked = model(input_ids=input_ids, policy=Policy.one_hot(flex.config, arch.indices, sliced=False)).logits
        direct = model.extract(budget)(input_ids).logits  # extract on the PEFT model merges the adapter
        for name, logits in (("sliced", sliced), ("masked", masked), ("extract", direct)):
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0, msg=f"{name} at budget {budget}")
        with model.disable_adapter():  # the adapter matters at every budget
            base = model(input_ids=input_ids, budget=budget if budget < 1 else None).logits
        assert (base - sliced).abs().max() > 1e-3
    for key, value in model.state_dict().items():  # extract left the PEFT model as it was
        assert torch.equal(value, state[key]), key


def test_generation_with_the_adapter_on(input_ids):
    model = flex_with_lora()
    prompt = input_ids[:1, :5]
    for budget in (0.5, 0.75):
        ours = model.generate(input_ids=prompt, budget=budget, max_new_tokens=6, do_sample=False)
        theirs = model.extract(budget).generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_gradients_reach_lora_routers_and_modulation_with_the_base_frozen(input_ids, mode):
    model = flex_with_lora(modules_to_save=["router", "modulation"]).train()
    flex = flex_model(model)
    seed = 0
    while True:  # a draw that drops query heads, so that the sliced rows can be checked
        policy = flex.route(0.3, mode, torch.Generator().manual_seed(seed))
        if policy.indices["heads"] == 0:
            break
        seed += 1
    out = model(input_ids=input_ids, policy=policy)
    (out.logits.square().mean() + budget_loss(flex.config, policy.probs, 0.3)).backward()
    depth = flex.config.depth_choices[policy.indices["depth"]]
    kept = set(flex.config.layer_ranking[:depth]) if mode == "hard" else set(range(flex.config.num_hidden_layers))
    groups: dict[str, list[bool]] = {}
    for name, p in model.named_parameters():
        group = parameter_group(name)
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if group == "llm":
            assert not p.requires_grad and p.grad is None, name
        elif group == "lora":  # every adapter of a kept layer, none of a dropped one
            assert has_grad == (int(name.split(".layers.")[1].split(".")[0]) in kept), name
        elif ".original_module." not in name:
            groups.setdefault(group, []).append(has_grad)
    assert any(groups["router"]) and any(groups["modulation"]), groups
    if mode == "hard":  # sliced: LoRA rows of the dropped heads get nothing
        q_proj = flex.model.layers[min(kept)].self_attn.q_proj
        heads, n_kv, d = flex.config.head_choices[0], flex.config.num_key_value_heads, flex.config.head_dim
        grad = q_proj.lora_B["default"].weight.grad.view(n_kv, -1, d, 4)  # (groups, heads per group, d, r)
        kept = heads // n_kv
        assert grad[:, :kept].abs().sum() > 0 and grad[:, kept:].abs().sum() == 0


def test_compensation_is_refused_on_an_adapted_model():
    """Least-squares compensation refits the base weights: with LoRA on, both collecting it and extracting with
    one (collected on the base model) are refused, naming the fix."""
    base = new_flex()
    compensation = Compensation.from_data(base, torch.randint(3, 128, (4, 16)), progress=False)
    model = add_lora(base, lora_config()).eval()
    with pytest.raises(ValueError, match="merge the adapter first"):
        Compensation.from_data(model, torch.randint(3, 128, (4, 16)), progress=False)
    with pytest.raises(ValueError, match="merge the adapter first"):
        model.extract(0.5, compensation=compensation)


def test_lora_variants_and_non_llamaflex_models_are_refused(tmp_path):
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama())
    with pytest.raises(ValueError, match="only vanilla LoRA"):
        add_lora(flex, lora_config(use_dora=True))
    peft_llama = get_peft_model(tiny_llama(), lora_config())
    with pytest.raises(TypeError, match=r"needs a LlamaFlexForCausalLM.*LlamaForCausalLM.*from_llama"):
        flex_model(peft_llama)
    with pytest.raises(TypeError, match="FlexTrainer needs a LlamaFlexForCausalLM"):
        FlexTrainer(model=peft_llama, args=arguments(tmp_path, distillation_weight=0), train_dataset=dataset())
    config = lora_config()
    config._register_custom_module({nn.Linear: ElasticLoraLinear})
    with pytest.raises(TypeError, match="adapts the ElasticLinear layers"):
        get_peft_model(tiny_llama(), config)


def test_frozen_base_training_saves_a_merged_checkpoint_and_the_adapter(tmp_path, input_ids):
    parent = tiny_llama()
    flex = LlamaFlexForCausalLM.from_llama(parent, budgets=[0.5, 0.75])
    base = copy.deepcopy(flex)
    args = arguments(tmp_path, lora_r=4, lora_alpha=8, router_learning_rate=0.03, modulation_learning_rate=0.02)
    trainer = FlexTrainer(model=flex, args=args, teacher_model=parent, train_dataset=dataset())
    assert isinstance(trainer.model, PeftModel)
    assert [(g["name"], g["lr"]) for g in trainer.create_optimizer().param_groups] == [
        ("lora", 1e-3), ("router", 0.03), ("modulation", 0.02)]
    trainer.train()
    for name, p in flex.named_parameters():  # the base weights did not move
        plain = name.replace(".base_layer", "")
        if parameter_group(name) == "llm":
            assert torch.equal(p.detach(), base.get_parameter(plain).detach()), name
    trainer.save_flex_model(str(tmp_path / "saved"))
    merged = LlamaFlexForCausalLM.from_pretrained(tmp_path / "saved").eval()  # plain LlamaFlex, adapter merged in
    adapted = load_lora(base, tmp_path / "saved" / "adapter").eval()  # the adapter on the old base
    trainer.model.eval()
    for budget in (0.5, 0.75, None):
        expected = trainer.model(input_ids=input_ids, budget=budget).logits
        torch.testing.assert_close(merged(input_ids, budget=budget).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted(input_ids=input_ids, budget=budget).logits, expected, atol=1e-5, rtol=0)
    for budget in (0.5, 0.75):  # routers trained with the adapter, and saved with it
        assert merged.architecture(budget).indices == trainer.flex.architecture(budget).indices


def test_run_py_lora_option(tmp_path):
    from conftest import word_tokenizer

    from training import run

    words = [f"w{i}" for i in range(40)]
    text = "\n".join(" ".join(words[(i * 7 + j) % 40] for j in range(12)) for i in range(300))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[:2000])
    word_tokenizer(words).save_pretrained(tmp_path / "tok")
    summary = run.main([
        "--tokenizer", str(tmp_path / "tok"), "--train_file", str(tmp_path / "train.txt"), "--block_size", "16",
        "--validation_file", str(tmp_path / "val.txt"), "--max_eval_samples", "4",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--save_strategy", "no", "--calibration_samples", "4", "--use_cpu", "true",
        "--elastic", '{"budgets": [0.5, 0.75]}', "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
    ])
    out = tmp_path / "out"
    assert summary["lora_r"] == 4 and (out / "adapter" / "adapter_config.json").exists()
    assert LlamaFlexForCausalLM.from_pretrained(out).config.model_type == "llamaflex"
    assert (out / "sub-models" / "budget-0.5" / "config.json").exists()
