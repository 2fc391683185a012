"""From a Llama parent to an elastic LlamaFlex model (docs/design.md, "Conversion")."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .importance import head_order, rank, score_units
from .search import ROUTER_FIT_POINTS
from .configuration_llamaflex import LlamaFlexConfig, default_choices

logger = logging.getLogger(__name__)


def load_llama(llama) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` from a model, a checkpoint folder, a `.gguf` file (de-quantised) or a built-in
    parent name such as `smollm2-135m` (see `parents.resolve_parent`); anything not Llama-shaped is refused."""
    from .parents import ParentSource, load_parent_model

    if isinstance(llama, (str, os.PathLike, ParentSource)):
        return load_parent_model(llama, dtype=torch.float32)
    check_llama_config(getattr(llama, "config", None), source=type(llama).__name__)
    if not isinstance(llama, LlamaForCausalLM):
        raise TypeError(f"the parent must be a transformers LlamaForCausalLM, got {type(llama).__name__}")
    return llama


def check_llama_config(config, source: str) -> None:
    if not isinstance(config, LlamaConfig) or getattr(config, "model_type", None) != "llama":
        kind = getattr(config, "model_type", type(config).__name__)
        raise ValueError(
            f"{source} is not a Llama-shaped parent (model_type {kind!r}); LlamaFlex converts 'llama' checkpoints "
            "(Llama 2, Llama 3.x)"
        )


@dataclass
class Orders:
    """The permutations that sort a parent by importance (most important first)."""

    hidden: torch.Tensor  # (hidden,)
    heads: torch.Tensor  # (layers, query heads), within KV groups
    mlp: torch.Tensor  # (layers, intermediate)
    layers: list[int]  # layer ranking (layers are not moved; depth keeps a prefix of this ranking)


def importance_orders(llama, calibration_data, batch_size: int = 8, progress: bool = True, importance=None,
                      min_depth: int | None = None) -> Orders:
    """Calibrate and rank every unit of the parent with the scorer chosen per axis (see `importance`);
    `min_depth`, the fewest layers a sub-model keeps, bounds the greedy layer order."""
    scores = score_units(llama, calibration_data, importance, batch_size, progress, min_depth)
    return Orders(
        hidden=rank(scores["hidden"]),
        heads=head_order(scores["heads"], llama.config.num_key_value_heads),
        mlp=rank(scores["mlp"]),
        layers=rank(scores["depth"]).tolist(),
    )


def permute_state_dict(state: dict[str, torch.Tensor], config, orders: Orders) -> dict[str, torch.Tensor]:
    """A new state dict with every tensor reordered consistently; the function of the model is unchanged."""
    out = dict(state)
    hidden, d = orders.hidden, config.head_dim

    def take(name, dim, index):
        if name in out:
            out[name] = out[name].index_select(dim, index.to(out[name].device))

    take("model.embed_tokens.weight", 1, hidden)
    if not config.tie_word_embeddings:
        take("lm_head.weight", 1, hidden)
    take("model.norm.weight", 0, hidden)
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        rows = (orders.heads[l][:, None] * d + torch.arange(d)[None, :]).reshape(-1)  # head order -> row order
        mlp = orders.mlp[l]
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            take(p + name, 0, hidden)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            take(p + name + ".weight", 1, hidden)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            take(p + name + ".weight", 0, hidden)
            take(p + name + ".bias", 0, hidden)
        take(p + "self_attn.q_proj.weight", 0, rows)
        take(p + "self_attn.q_proj.bias", 0, rows)
        take(p + "self_attn.o_proj.weight", 1, rows)
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            take(p + name + ".weight", 0, mlp)
            take(p + name + ".bias", 0, mlp)
        take(p + "mlp.down_proj.weight", 1, mlp)
    return out


@torch.no_grad()
def calibrate_norm_gains(flex, data, batch_size: int = 8, progress: bool = True) -> list[list[float]]:
    """`config.hidden_norm_gains` of a converted model (its channels in importance order), from the full model's
    RMSNorm inputs x on `data`: per hidden choice k and norm, the mean over tokens of RMS(x[:k]) / RMS(x).

    A sub-model's RMSNorm divides by the RMS of its k kept channels; when the dropped ones carry less than their
    share of the energy that RMS is larger than the parent's, and every norm output shrinks (by up to sqrt(H/k)).
    The gain restores the parent's scale on average; it is 1 for the full width.
    """
    from .importance import device_batches

    config = flex.config
    choices = config.hidden_choices
    norms = [module for layer in flex.model.layers for module in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(flex.model.norm)
    sums = torch.zeros(len(choices), len(norms), dtype=torch.float64)
    batch: dict = {}

    def watch(index):
        def hook(module, args):
            square = args[0].float().pow(2)
            total = square.mean(-1) + module.variance_epsilon
            mask = batch["mask"].float()
            for c, k in enumerate(choices):
                ratio = ((square[..., :k].mean(-1) + module.variance_epsilon) / total).sqrt()
                sums[c, index] += float((ratio * mask).sum())

        return hook

    hooks = [norm.register_forward_pre_hook(watch(i)) for i, norm in enumerate(norms)]
    tokens = 0
    try:
        for ids, mask in device_batches(flex, data, batch_size, progress, "norm gains"):
            batch["mask"] = mask
            flex(input_ids=ids, attention_mask=mask, use_cache=False)
            tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
    gains = (sums / max(tokens, 1)).tolist()
    gains[-1] = [1.0] * len(norms)  # the full width: exactly the parent
    return [[round(g, 6) for g in row] for row in gains]


@torch.no_grad()
def from_llama(cls, llama, calibration_data=None, batch_size: int = 8, progress: bool = True, importance=None,
               score_data=None, score_budgets=None, top_k: int = 8, norm_correction: bool = False,
               router_fit_points: int = ROUTER_FIT_POINTS, **elastic):
    """An elastic model holding the parent's weights; at full budget it gives the parent's logits.

    With `calibration_data` (token ids: a tensor, a list of sequences, a `datasets.Dataset` or batches),
    every unit is ranked by importance and the weights are permuted so that each sub-model keeps the most
    important units as a prefix; the layer ranking goes into the config. Without it, the parent's order is
    kept. `importance` picks the scorer per axis (a name or {axis: name}; `importance.SCORERS`).

    With calibration data, architectures are then ranked by quality (`search.score_architectures`): the
    single-axis cuts and the `top_k` best-predicted candidates of each of `score_budgets` (default: the trained
    budgets and the midpoints between them) are scored by KL to the parent on `score_data` (default: the
    calibration data), stored in `config.architecture_scores`, and the routers are fitted so that their argmax
    at each trained budget, and at `router_fit_points` budgets from the smallest trained one to 1, is the best
    measured architecture within that budget's tolerance (`search.router_fit_family`; 0: the trained budgets
    only). `top_k=0` skips this.
    With calibration data and `norm_correction`, each hidden width gets RMSNorm gains that give its norm outputs
    the parent's scale (`calibrate_norm_gains`, `config.hidden_norm_gains`), measured before the scoring. Off by
    default: on SmolLM2 they help a cut of the hidden width alone but hurt sub-models that also cut heads, MLP
    or depth (docs/design.md, "Conversion").
    `elastic` overrides `LlamaFlexConfig` fields (choices, budgets, ...). The parent is not modified.
    """
    llama = load_llama(llama)
    state = llama.state_dict()
    if calibration_data is not None:
        with torch.enable_grad():  # Taylor scorers need a backward pass
            min_depth = min(elastic.get("depth_choices") or default_choices(llama.config)["depth_choices"])
            orders = importance_orders(llama, calibration_data, batch_size, progress, importance, min_depth)
        state = permute_state_dict(state, llama.config, orders)
        elastic.setdefault("layer_ranking", orders.layers)
    config = LlamaFlexConfig.from_llama_config(llama.config, **elastic)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the (permuted) embedding
    flex = cls(config).to(dtype=llama.dtype, device=llama.device)
    missing, unexpected = flex.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".router." not in k and ".modulation." not in k and k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"the parent's weights do not fit a LlamaFlex model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        flex.tie_weights()
    flex.generation_config = llama.generation_config
    config = flex.config
    if calibration_data is not None and norm_correction and len(config.hidden_choices) > 1:
        config.hidden_norm_gains = calibrate_norm_gains(flex.eval(), calibration_data, batch_size, progress)
    if calibration_data is not None and top_k > 0 and config.elastic:
        from .search import fit_routers, router_fit_family, score_architectures

        data = calibration_data if score_data is None else score_data
        config.architecture_scores = score_architectures(flex, data, score_budgets, top_k, batch_size, progress)
        # the routers are trained to hold each budget within tolerance: they start from the best within it, at
        # the trained budgets and at budgets between them
        family = router_fit_family(config, router_fit_points)
        matched = fit_routers(flex, family)
        if not all(matched.values()):
            logger.warning("routers could not be fitted to the one-shot family at budgets %s",
                           [b for b, ok in matched.items() if not ok])
    if calibration_data is None:
        logger.info("no calibration data: the units keep the parent's order (no importance ranking)")
    return flex.eval()


__all__ = ["Orders", "calibrate_norm_gains", "from_llama", "importance_orders", "load_llama", "permute_state_dict"]
