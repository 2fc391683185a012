"""LlamaFlex: a Llama whose every layer can run as any sub-model of a nested family (docs/design.md).

Parameter names are exactly those of `LlamaForCausalLM` (plus `model.router.*` and `model.modulation.*`),
so a Llama checkpoint loads as is. A forward runs one of three ways:

* no budget: the whole parent (or, for a model loaded at a budget, the one sub-model it holds);
* an `Architecture` (`budget=` or `architecture=` at inference; hard samples in training): *sliced*, every
  Linear slices its own weight and dropped layers are skipped, so compute scales with the sub-model;
* a soft policy (router training): *masked*, full width with soft staircase masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .architecture import Architecture, architecture_for_logits, budget_loss, expected_parameters, is_full
from .configuration_llamaflex import AXES, LlamaFlexConfig, parse_budget
from .elastic import ElasticLinear, ElasticRMSNorm, ElasticState, Policy, apply_mask, norm_gains
from .layers import LlamaFlexAttention, LlamaFlexDecoderLayer
from .lora import ElasticParent
from .modulation import AxisModulation, PolicyModulation
from .router import BudgetRouter, gumbel_softmax, routers_trained


@dataclass
class LlamaFlexCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, for routed forwards, the router's budget loss and expected size."""

    budget_loss: torch.Tensor | None = None
    expected_parameters: torch.Tensor | None = None


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
    _can_record_outputs = {"hidden_states": LlamaFlexDecoderLayer, "attentions": LlamaFlexAttention}

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
        """Load the elastic model, or with `budget=` only the sub-model of that budget.

        The Auto classes move a `budget=` keyword into the config before calling this, so the budget is
        read from the config too. At a budget, only the needed slices are read from the safetensors files,
        modulation is folded into the weights, and the model returned holds just that sub-model. Loading is
        strict: a checkpoint with missing, unexpected or wrong-shaped weights is refused, naming them.
        """
        from .loading import check_loading_info, load_at_budget, resolve_load_budget

        config, budget = resolve_load_budget(cls, pretrained_model_name_or_path, budget, kwargs)
        if budget is not None:
            return load_at_budget(cls, pretrained_model_name_or_path, config, budget, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **kwargs
        )
        check_loading_info(pretrained_model_name_or_path, config, info)
        return (model, info) if want_info else model


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

    def route(
        self,
        budget: float,
        mode: str = "soft",
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
    ) -> Policy:
        """Sample a training policy for `budget` from the routers.

        mode "soft": Gumbel-Softmax probabilities, masked forward. "hard": straight-through one-hot, sliced
        forward. "argmax": the routers' most likely choices, no noise, sliced forward. `temperature` (τ) and
        `logit_scale` (κ) shape the Gumbel-Softmax; the trainer's schedules set them.
        """
        self._require_elastic()
        if mode not in ("soft", "hard", "argmax"):
            raise ValueError(f"mode must be 'soft', 'hard' or 'argmax', got {mode!r}")
        budget = parse_budget(budget, self.config.parent_parameters())
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
        b = parse_budget(budget, self.config.parent_parameters())
        logits = self.router(torch.tensor(b, device=self.embed_tokens.weight.device))
        # keyed on the logits themselves: cheap to compute, and never stale after an optimizer step
        trained = routers_trained(self.router)
        key = (b, trained, tuple(tuple(logits[a].float().cpu().tolist()) for a in AXES))
        if key in self._architecture_cache:
            return self._architecture_cache[key]
        arch = architecture_for_logits(self.config, b, logits, trained)
        self._architecture_cache = {key: arch}
        return arch

    def architecture_at(self, budget: float | str | None = None) -> Architecture | None:
        """The sub-model a forward at `budget` runs (no budget: `config.budget`); None for the whole model."""
        if not self.config.elastic:
            if budget is not None and budget != self.config.budget:
                self._require_elastic()
            return None  # a model loaded at a budget is that sub-model
        budget = self.config.budget if budget is None else budget
        return None if budget is None else self.architecture(budget)

    def elastic_state(self, architecture: Architecture | None = None, policy: Policy | None = None) -> ElasticState | None:
        """What the layers need for one forward: of a training `policy`, or of an `architecture` (None or the
        parent's own architecture: the parent itself, no slicing and no modulation)."""
        if policy is not None:
            state = ElasticState(self.config, policy)
            state.gains = self.modulation(policy.probs) if self.modulation is not None else None
            state.norm_gains = norm_gains(self.config, policy.probs["hidden"])
            return state
        if architecture is None or is_full(self.config, architecture.indices):
            return None
        state = ElasticState.for_architecture(architecture)
        state.gains = self.modulation.for_indices(architecture.indices) if self.modulation is not None else None
        state.norm_gains = norm_gains(self.config, architecture.indices["hidden"], self.embed_tokens.weight.device)
        return state

    # ---- forward ----
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        budget: float | str | None = None,
        architecture: Architecture | None = None,
        policy: Policy | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        budget: run the sub-model of this budget (sliced). Without it, `config.budget`, else the full model.
        architecture: run this `Architecture` (from `architecture(b)`; no routers run in the forward).
        policy: run a training `Policy` (from `route()`) instead.
        Hidden states (`output_hidden_states=True`) are those of the layers that run: depth + 1 at a budget.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if policy is None and architecture is None:
            architecture = self.architecture_at(budget)
        state = self.elastic_state(architecture, policy)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if state is not None and state.sliced:
            inputs_embeds = inputs_embeds[..., : state.hidden]
        if state is not None:
            inputs_embeds = apply_mask(inputs_embeds, state.hidden_mask)
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
        layers = state.kept_layers if state is not None else range(self.config.num_hidden_layers)
        for cache_idx, layer in enumerate(layers):  # a sub-model's cache holds its own layers only
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
        if state is not None:
            hidden_states = self.norm(hidden_states, state.width_scale, state.norm_gain(2 * self.config.num_hidden_layers))
        else:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class LlamaFlexForCausalLM(LlamaFlexPreTrainedModel, GenerationMixin, ElasticParent):  # ElasticParent: for lm_head
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {}  # no tensor parallelism: a shard of an ElasticLinear weight is not a prefix of it
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

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

    def extract(self, budget: float | str | Architecture, compensation=None):
        """The sub-model of `budget` as a plain `transformers.LlamaForCausalLM`, modulation folded in; with a
        `compensation.Compensation` (`Compensation.from_data(model, calibration)`), its o_proj and down_proj
        refitted by least squares to the full model's outputs (better one-shot sub-models; docs/design.md)."""
        from .slicing import extract

        return extract(self, budget, compensation)

    def generate(self, *args, budget: float | str | None = None, architecture: Architecture | None = None, **kwargs):
        """`GenerationMixin.generate` at a budget: the routers choose the architecture once per call, and every
        decoding step runs that architecture (no router, no host sync per step)."""
        if architecture is None:
            architecture = self.model.architecture_at(budget)
        return super().generate(*args, architecture=architecture, **kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
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
        architecture: Architecture | None = None,
        policy: Policy | None = None,
        route_mode: str | None = None,
        generator: torch.Generator | None = None,
        gumbel_temperature: float = 1.0,
        logit_scale: float = 1.0,
        **kwargs,
    ) -> LlamaFlexCausalLMOutput:
        r"""
        budget: run the sub-model of this budget (sliced). Without it, `config.budget`, else the full model.
        architecture: run this `Architecture` (from `architecture(b)`) without running the routers.
        policy: run a training `Policy` (from `route()`) instead.
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
            architecture=architecture,
            policy=policy,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = LlamaFlexCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        if routed_budget is not None:
            output.budget_loss = budget_loss(self.config, policy.probs, routed_budget)
            output.expected_parameters = expected_parameters(self.config, policy.probs)
        return output


__all__ = ["LlamaFlexForCausalLM", "LlamaFlexModel", "LlamaFlexPreTrainedModel"]

# save_pretrained writes auto_map and copies this package's files, for trust_remote_code=True
LlamaFlexConfig.register_for_auto_class()
LlamaFlexModel.register_for_auto_class("AutoModel")
LlamaFlexForCausalLM.register_for_auto_class("AutoModelForCausalLM")
