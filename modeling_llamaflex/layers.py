"""The layers of a LlamaFlex decoder: Llama's attention, MLP and decoder layer, each running at the widths
of an `ElasticState` (sliced: the sub-model's own shapes; masked: full width under soft masks), or as the
parent when the state is None."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .configuration_llamaflex import LlamaFlexConfig
from .elastic import ElasticLinear, ElasticRMSNorm, ElasticState, apply_mask
from .lora import ElasticParent


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
        out, weights = attention(
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
        return self.o_proj(out, state.hidden if sliced else None), weights


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
        gains = (None, None) if state is None else (state.norm_gain(2 * self.layer_idx), state.norm_gain(2 * self.layer_idx + 1))
        branch, _ = self.self_attn(
            self.input_layernorm(hidden_states, scale, gains[0]), state, position_embeddings, attention_mask, cache,
            cache_idx, **kwargs
        )
        hidden_states = hidden_states + self._scale_branch(branch, state, 0)
        branch = self.mlp(self.post_attention_layernorm(hidden_states, scale, gains[1]), state)
        return hidden_states + self._scale_branch(branch, state, 1)

    def _scale_branch(self, branch: torch.Tensor, state: ElasticState | None, which: int) -> torch.Tensor:
        if state is None:
            return branch
        branch = apply_mask(branch, state.branch_scale(self.layer_idx, which))
        return apply_mask(branch, state.hidden_mask)


__all__ = ["LlamaFlexAttention", "LlamaFlexDecoderLayer", "LlamaFlexMLP"]
