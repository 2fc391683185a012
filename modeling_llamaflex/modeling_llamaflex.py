"""LlamaFlex: a Llama whose every layer can run as any sub-model of a nested family (DESIGN.md §3, §5).

Parameter names are exactly those of `LlamaForCausalLM` (plus `model.router.*` and `model.modulation.*`),
so a Llama checkpoint loads as is. A forward runs one of three ways:

* no budget: the whole parent (or, for a model loaded at a budget, the one sub-model it holds);
* a hard policy (`budget=...` at inference, or hard samples in training): *sliced*, every Linear slices its
  own weight and dropped layers are skipped, so compute scales with the sub-model;
* a soft policy (router training): *masked*, full width with soft staircase masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

from .architecture import Architecture, architecture_for_logits, budget_loss, expected_parameters, is_full
from .configuration_llamaflex import AXES, LlamaFlexConfig, parse_budget
from .elastic import ElasticLinear, ElasticRMSNorm, ElasticState, Policy, apply_mask
from .lora import ElasticParent
from .modulation import AxisModulation, PolicyModulation
from .router import BudgetRouter, gumbel_softmax, routers_trained


@dataclass
class LlamaFlexCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, for routed forwards, the router's budget loss and expected size."""

    budget_loss: torch.Tensor | None = None
    expected_parameters: torch.Tensor | None = None


class LlamaFlexMLP(ElasticParent):
    def __init__(self, config: LlamaFlexConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = ElasticLinear(h, f, bias=config.mlp_bias)
        self.up_proj = ElasticLinear(h, f, bias=config.mlp_bias)
        self.down_proj = ElasticLinear(f, h, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, state: ElasticState | None = None) -> torch.Tensor:
        width = state.mlp if state is not None else None
        hidden = state.hidden if state is not None else None
        inner = self.act_fn(self.gate_proj(x, width)) * self.up_proj(x, width)
        inner = apply_mask(inner, state.mlp_mask if state is not None else None)
        return self.down_proj(inner, hidden)


class _GroupsView:
    """The attention module as the attention functions see it, with the GQA ratio of one sliced forward."""

    __slots__ = ("_module", "num_key_value_groups")

    def __init__(self, module: nn.Module, groups: int):
        self._module = module
        self.num_key_value_groups = groups

    def __getattr__(self, name):  # everything else (training, config, is_causal, layer_idx...) from the module
        return getattr(self._module, name)


class LlamaFlexAttention(ElasticParent):
    """Llama attention whose query heads are kept as a prefix within every KV group."""

    def __init__(self, config: LlamaFlexConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, d, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = ElasticLinear(h, self.num_heads * d, bias=bias, out_groups=self.num_kv_heads)
        self.k_proj = ElasticLinear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = ElasticLinear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = ElasticLinear(self.num_heads * d, h, bias=bias, in_groups=self.num_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        state: ElasticState | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        cache_idx: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        sliced = state is not None and state.sliced
        heads = state.heads if sliced else self.num_heads
        input_shape = x.shape[:-1]
        query = self.q_proj(x, heads * self.head_dim if sliced else None).view(*input_shape, -1, self.head_dim)
        key = self.k_proj(x).view(*input_shape, -1, self.head_dim)
        value = self.v_proj(x).view(*input_shape, -1, self.head_dim)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx if cache_idx is None else cache_idx)

        # the attention functions read the GQA ratio off the module: a sub-model's goes in a per-call view,
        # never into the module itself (forwards at different budgets may run at once, in threads)
        groups = heads // self.num_kv_heads
        module = self if groups == self.num_key_value_groups else _GroupsView(self, groups)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        if state is not None:
            out = apply_mask(out, state.head_mask)  # (B, T, heads, d): per-head mask or scalar gate
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out, state.hidden if sliced else None)


class LlamaFlexDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaFlexConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LlamaFlexAttention(config, layer_idx)
        self.mlp = LlamaFlexMLP(config)
        self.input_layernorm = ElasticRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ElasticRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: ElasticState | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        cache_idx: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        scale = state.width_scale if state is not None else None
        branch = self.self_attn(
            self.input_layernorm(hidden_states, scale), state, position_embeddings, attention_mask, cache, cache_idx, **kwargs
        )
        hidden_states = hidden_states + self._scale_branch(branch, state, 0)
        branch = self.mlp(self.post_attention_layernorm(hidden_states, scale), state)
        return hidden_states + self._scale_branch(branch, state, 1)

    def _scale_branch(self, branch: torch.Tensor, state: ElasticState | None, which: int) -> torch.Tensor:
        if state is None:
            return branch
        branch = apply_mask(branch, state.branch_scale(self.layer_idx, which))
        return apply_mask(branch, state.hidden_mask)


class LlamaFlexPreTrainedModel(PreTrainedModel):
    config_class = LlamaFlexConfig
    config: LlamaFlexConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaFlexDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and getattr(module, "_fan_in_init", False):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            init.zeros_(module.bias)
        if isinstance(module, AxisModulation):
            init.copy_(module.choice_embedding, module.make_table())
        if isinstance(module, BudgetRouter):
            init.zeros_(module.trained_steps)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and this package's code; `auto_map` names all three Auto classes."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(
            AutoConfig="configuration_llamaflex.LlamaFlexConfig",
            AutoModel="modeling_llamaflex.LlamaFlexModel",
            AutoModelForCausalLM="modeling_llamaflex.LlamaFlexForCausalLM",
        )
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, budget=None, **kwargs):
        """Load the elastic model, or with `budget=` only the sub-model of that budget (DESIGN.md §5).

        The Auto classes move a `budget=` keyword into the config before calling this, so the budget is
        read from the config too. At a budget, only the needed slices are read from the safetensors files,
        modulation is folded into the weights, and the model returned holds just that sub-model.
        """
        from .export import load_at_budget, resolve_load_budget

        config, budget = resolve_load_budget(cls, pretrained_model_name_or_path, budget, kwargs)
        if budget is not None:
            return load_at_budget(cls, pretrained_model_name_or_path, config, budget, **kwargs)
        kwargs["config"] = config
        kwargs["output_loading_info"] = True
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        missing = [k for k in info["missing_keys"] if ".router." in f".{k}"]
        if missing and config.elastic:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no router weights ({missing[0]} and {len(missing) - 1} more "
                "missing): it cannot choose an architecture for a budget. Build an elastic model from a Llama "
                "with LlamaFlexForCausalLM.from_llama(...) and train it, or load a LlamaFlex checkpoint."
            )
        return model


class LlamaFlexModel(LlamaFlexPreTrainedModel):
    """The decoder stack, with the routers and modulation networks that choose and tune each sub-model."""

    def __init__(self, config: LlamaFlexConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaFlexDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ElasticRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.router = BudgetRouter(config) if config.elastic else None
        self.modulation = PolicyModulation(config) if config.elastic and config.use_modulation else None
        self._architecture_cache: dict = {}
        self.gradient_checkpointing = False
        self.post_init()

    # ---- routing ----
    def _require_elastic(self) -> None:
        if not self.config.elastic:
            raise ValueError(
                f"this model holds one sub-model only (loaded at budget {self.config.budget!r}); load the elastic "
                "checkpoint without a budget to choose other budgets"
            )

    def parent_parameters(self) -> int:
        return self.config.parent_parameters()

    def route(
        self,
        budget: float,
        mode: str = "soft",
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
    ) -> Policy:
        """Sample a policy for `budget` from the routers.

        mode "soft": Gumbel-Softmax probabilities, masked forward. "hard": straight-through one-hot, sliced
        forward. "argmax": the routers' most likely choices, no noise, sliced forward. `temperature` (τ) and
        `logit_scale` (κ) shape the Gumbel-Softmax; the trainer's schedules set them.
        """
        self._require_elastic()
        if mode not in ("soft", "hard", "argmax"):
            raise ValueError(f"mode must be 'soft', 'hard' or 'argmax', got {mode!r}")
        budget = parse_budget(budget, self.parent_parameters())
        device = self.embed_tokens.weight.device
        logits = self.router(torch.tensor(budget, device=device))
        if mode == "argmax":
            return Policy.one_hot(self.config, {a: int(logits[a].argmax()) for a in AXES}, device=device)
        probs = {
            axis: gumbel_softmax(l, temperature, logit_scale, hard=mode == "hard", generator=generator)
            for axis, l in logits.items()
        }
        return Policy(probs, sliced=mode == "hard")

    @torch.no_grad()
    def architecture(self, budget: float | str) -> Architecture:
        """The sub-model for `budget` (a fraction, or a size such as "3B"): see `architecture_for_logits`."""
        self._require_elastic()
        b = parse_budget(budget, self.parent_parameters())
        logits = self.router(torch.tensor(b, device=self.embed_tokens.weight.device))
        # keyed on the logits themselves: cheap to compute, and never stale after an optimizer step
        trained = routers_trained(self.router)
        key = (b, trained, tuple(tuple(logits[a].float().cpu().tolist()) for a in AXES))
        if key in self._architecture_cache:
            return self._architecture_cache[key]
        arch = architecture_for_logits(self.config, b, logits, trained)
        self._architecture_cache = {key: arch}
        return arch

    def policy_for(self, budget=None, architecture: Architecture | None = None) -> Policy | None:
        """The hard policy for a budget or an architecture; None for the full (or collapsed) model.

        Without a budget, an elastic model runs at `config.budget` (None: the full parent).
        """
        if architecture is None:
            if not self.config.elastic:
                if budget is not None and budget != self.config.budget:
                    self._require_elastic()
                return None
            budget = self.config.budget if budget is None else budget
            if budget is None:
                return None
            architecture = self.architecture(budget)
        if is_full(self.config, architecture.indices):
            return None  # the parent itself: no slicing, no modulation
        return Policy.one_hot(self.config, architecture.indices, device=self.embed_tokens.weight.device)

    # ---- forward ----
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        budget: float | str | None = None,
        policy: Policy | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if policy is None:
            policy = self.policy_for(budget)
        state = None
        if policy is not None:
            state = ElasticState(self.config, policy)
            if self.modulation is not None:
                state.gains = self.modulation(policy.probs)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if state is not None and state.sliced:
            inputs_embeds = inputs_embeds[..., : state.hidden]
        if state is not None:
            inputs_embeds = apply_mask(inputs_embeds, state.hidden_mask)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, position_ids=position_ids
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden = [] if output_hidden_states else None
        layers = state.kept_layers if state is not None else range(self.config.num_hidden_layers)
        for cache_idx, layer in enumerate(layers):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = self.layers[layer](
                hidden_states,
                state,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                cache_idx=cache_idx,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states, state.width_scale if state is not None else None)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, hidden_states=tuple(all_hidden) if all_hidden else None
        )


class LlamaFlexForCausalLM(LlamaFlexPreTrainedModel, GenerationMixin, ElasticParent):  # ElasticParent: for lm_head
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaFlexConfig):
        super().__init__(config)
        self.model = LlamaFlexModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = ElasticLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # the elastic API lives on the decoder; expose it here too
    def architecture(self, budget: float | str) -> Architecture:
        return self.model.architecture(budget)

    def route(self, budget: float, mode: str = "soft", generator: torch.Generator | None = None, **gumbel) -> Policy:
        return self.model.route(budget, mode, generator, **gumbel)

    @classmethod
    def from_llama(cls, llama, calibration_data=None, **elastic) -> LlamaFlexForCausalLM:
        """An elastic model from a Llama parent (a `LlamaForCausalLM` or a path); see `convert.from_llama`."""
        from .convert import from_llama

        return from_llama(cls, llama, calibration_data, **elastic)

    def extract(self, budget: float | str | Architecture):
        """The sub-model of `budget` as a plain `transformers.LlamaForCausalLM`, modulation folded in."""
        from .export import extract

        return extract(self, budget)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        budget: float | str | None = None,
        policy: Policy | None = None,
        route_mode: str | None = None,
        generator: torch.Generator | None = None,
        gumbel_temperature: float = 1.0,
        logit_scale: float = 1.0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> LlamaFlexCausalLMOutput:
        r"""
        budget: run the sub-model of this budget (sliced). Without it, `config.budget`, else the full model.
        policy: run an explicit `Policy` (from `route()` or `Policy.one_hot`) instead.
        route_mode: "soft" or "hard": sample the policy for `budget` from the routers inside this forward
            (training; Gumbel noise from `generator`, temperature `gumbel_temperature`, router logits scaled by
            `logit_scale`), and return the budget loss and expected size with it.
        """
        routed_budget = None
        if route_mode is not None:
            if budget is None:
                raise ValueError("route_mode needs a budget to route")
            policy = self.model.route(budget, route_mode, generator, gumbel_temperature, logit_scale)
            routed_budget = parse_budget(budget, self.config.parent_parameters())
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            budget=budget,
            policy=policy,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = LlamaFlexCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
        if routed_budget is not None:
            output.budget_loss = budget_loss(self.config, policy.probs, routed_budget)
            output.expected_parameters = expected_parameters(self.config, policy.probs)
        return output


__all__ = ["LlamaFlexForCausalLM", "LlamaFlexModel", "LlamaFlexPreTrainedModel"]

# save_pretrained writes auto_map and copies this package's files, for trust_remote_code=True
LlamaFlexConfig.register_for_auto_class()
LlamaFlexModel.register_for_auto_class("AutoModel")
LlamaFlexForCausalLM.register_for_auto_class("AutoModelForCausalLM")
