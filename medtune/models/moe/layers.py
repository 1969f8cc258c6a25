"""Mixture-of-experts building blocks: upcycle a dense decoder's FFNs into routed experts + a shared expert.

This is Med-MoE's stage 3 (every other FFN of a trained LLM becomes a mixture of experts that are copies of
that FFN, the FFN itself stays as an always-on shared "meta" expert, a per-layer router picks the experts)
written on transformers' own MoE machinery, with no DeepSpeed and no distributed initialisation.

Pieces, one per concept, each usable alone:

- :class:`MoESettings` (defined torch-free in :mod:`medtune.models.moe.settings`, re-exported here): the recipe
  stage's ``moe:`` section, stored in the model config.
- :class:`MoERouter`: ``Linear(H, E)`` (with bias, as Med-MoE's gate) computed in float32 whatever the model
  dtype; softmax, top-k, optional renormalisation. Returns (logits, weights, index) like transformers' routers.
- :class:`MoEExperts`: all experts as fused 3-D weights, dispatched by transformers'
  ``use_experts_implementation`` (``eager`` = our loop, ``grouped_mm``, ``batched_mm``). Gated FFNs (Llama,
  Mistral, Qwen2, StableLM) keep ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``;
  ungated ones (Phi: fc1 -> act -> fc2) keep ``up_proj [E, I, H]`` and ``down_proj [E, H, I]``; biases
  ``*_bias [E, out]`` when the FFN has them. The dispatch setting lives in the experts' own small config,
  because a Llama/Phi host model forces its config to ``eager`` and refuses to change it.
- :class:`MoEBlock`: replaces one decoder layer's ``mlp``; submodules ``gate``, ``experts``, ``shared_expert``
  (the host's own FFN object, so its keys keep the host's names) and, optionally, ``shared_expert_gate``.
  Output = shared expert + sum over the top-k of weight * expert. It records the router logits of its last
  forward (``router_logits``, [tokens, E], float32, with their graph) for the auxiliary losses and routing
  statistics: no output-recording registry is patched, so other models in the process are unaffected.

Choices:

- Routing weights are the softmax probabilities of the chosen experts, not renormalised (Med-MoE and
  Qwen2-MoE's default); ``renormalize`` makes them sum to 1 (Mixtral).
- Dropless by default (Med-MoE never drops a token). With ``capacity_factor`` set, each expert takes at most
  ``ceil(factor * tokens * top_k / experts)`` assignments; first choices have priority over second choices,
  then earlier tokens over later ones. A dropped assignment gets weight 0 (the token keeps the shared expert's
  output; the expert still computes it, so capacity saves no compute here: it is a semantic, not a speed,
  setting) and is counted in ``MoEBlock.dropped_tokens``.
- ``init="faithful"`` (Med-MoE): every expert is an exact copy of the FFN, so at step 0 a token's output is
  ``FFN(x) + p * FFN(x) = (1 + p) * FFN(x)`` with ``p`` its chosen expert's probability. Not
  function-preserving.
- ``init="preserving"``: the layer output equals the dense FFN at step 0. With a shared expert the identity
  is *routed contribution = 0*: each expert's up (and gate) projections are copies of the FFN's, its down
  projection (and bias) starts at zero, so ``shared(x) + sum_k w_k * 0 = FFN(x)`` exactly, bit for bit. The
  down projections receive gradient at the first step (their input, the copies' hidden activations, is not
  zero), the up projections from the second; the router gets no gradient from the output until then.
  Without a shared expert the identity is *identical copies with weights summing to 1*: top-k weights are
  renormalised (or k = E), so ``sum_k w_k * FFN(x) = FFN(x)`` up to float rounding of the weights' sum.
- A gated shared expert (``shared_expert_gate``, Qwen2-MoE's sigmoid(Linear(H, 1))) starts with a zero gate
  and the shared FFN's down projection doubled, so ``sigmoid(0) * 2 * FFN(x) = FFN(x)`` exactly: both factors
  are powers of two. This changes the host FFN object passed to ``from_dense`` in place.
- ``expert_noise`` adds Gaussian noise of std ``expert_noise * std(weight)`` to every expert copy (independent
  per expert), seeded from ``seed`` and the layer index. Zeroed down projections get none.
- A random router is initialised like ``nn.Linear`` (uniform in +-1/sqrt(H), weight and bias), seeded from
  ``seed`` and the layer index so that layers differ. A trained router (``load_router``) is copied into every
  converted layer (separate parameters, equal values), as Med-MoE does.

On disk, :func:`register_checkpoint_layout` makes ``save_pretrained`` write one key per expert
(``mlp.experts.{e}.gate_proj.weight`` ..., or ``mlp.experts.{e}.fc1.weight`` ... for Phi), the layout of
transformers 4.x Qwen2-MoE checkpoints and of vLLM's loaders, and ``from_pretrained`` fuse them back.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations import use_experts_implementation

from medtune.errors import SpecError
from medtune.models.moe.settings import EXPERTS_IMPLEMENTATIONS, MoESettings

__all__ = ["ExpertsConfig", "MoEBlock", "MoEExperts", "MoERouter", "MoESettings", "auxiliary_losses", "build_layers",
           "load_router", "moe_blocks", "register_checkpoint_layout", "routing_counts", "save_router",
           "set_experts_implementation", "upcycle_layers"]

FFN_LAYOUTS = ("gated", "fc")


# ------------------------------------------------------------------------------------------------- router


class MoERouter(nn.Module):
    """Per-token router: logits = W x + b in float32, softmax, top-k (optionally renormalised).

    Parameters ``weight [E, H]`` and ``bias [E]`` (state-dict keys ``gate.weight``/``gate.bias``) keep the
    model's dtype; the product is computed in float32, as Med-MoE runs its gate.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, bias: bool = True,
                 renormalize: bool = False, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(num_experts, dtype=dtype, device=device)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default init (uniform in +-1/sqrt(H)), drawn from ``generator`` when given."""
        bound = 1 / math.sqrt(self.weight.shape[1])
        for parameter in (self.weight, self.bias):
            if parameter is not None:
                values = torch.empty(parameter.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                with torch.no_grad():
                    parameter.copy_(values)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (logits [T, E] float32, top_k_weights [T, k] float32, top_k_index [T, k] long)."""
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(hidden.float(), self.weight.float(), bias)
        probabilities = logits.softmax(dim=-1)
        weights, index = probabilities.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, index

    def extra_repr(self) -> str:
        return (f"hidden={self.weight.shape[1]}, experts={self.num_experts}, top_k={self.top_k}, "
                f"bias={self.bias is not None}, renormalize={self.renormalize}")


# ------------------------------------------------------------------------------------------------ experts


@dataclass
class ExpertsConfig:
    """What :class:`MoEExperts` is built from; also the object transformers' dispatch reads
    ``_experts_implementation`` from (a host Llama/Phi config is pinned to ``eager``)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    gated: bool
    """gate_up_proj + act(gate) * up (Llama, Qwen2, StableLM), or up_proj + act (Phi)."""
    bias: bool
    implementation: str = "grouped_mm"

    @property
    def _experts_implementation(self) -> str:
        return self.implementation


def _layout_per_instance(experts_class: type[nn.Module]) -> type[nn.Module]:
    """transformers' decorator fixes ``has_gate``/``has_bias`` per class; one MoEExperts class serves gated and
    Phi-style FFNs, with and without biases, so the flags are set per instance from its config, after the
    decorated ``__init__`` has written the class-wide defaults."""
    decorated_init = experts_class.__init__

    @functools.wraps(decorated_init)
    def __init__(self, config: ExpertsConfig, *args, **kwargs):
        decorated_init(self, config, *args, **kwargs)
        self.has_gate, self.has_bias = config.gated, config.bias

    experts_class.__init__ = __init__
    return experts_class


@_layout_per_instance
@use_experts_implementation
class MoEExperts(nn.Module):
    """E FFN experts as fused 3-D weights ([E, out, in], transformers' layout), forward per the transformers
    experts contract: (hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], weighted and summed
    over k. This class's own forward is the ``eager`` implementation."""

    def __init__(self, config: ExpertsConfig, act_fn: nn.Module, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim, self.intermediate_dim = config.hidden_size, config.intermediate_size
        self.act_fn = act_fn
        experts, hidden, intermediate = config.num_experts, config.hidden_size, config.intermediate_size
        up_name = "gate_up_proj" if config.gated else "up_proj"
        up_rows = 2 * intermediate if config.gated else intermediate   # gate rows first, then up rows

        def parameter(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))

        self.register_parameter(up_name, parameter(experts, up_rows, hidden))
        self.down_proj = parameter(experts, hidden, intermediate)
        if config.bias:
            self.register_parameter(f"{up_name}_bias", parameter(experts, up_rows))
            self.down_proj_bias = parameter(experts, hidden)
        self.reset_parameters()

    @property
    def ffn_layout(self) -> str:
        """``gated`` (gate_up_proj) or ``fc`` (Phi's up_proj): what ``register_checkpoint_layout`` needs."""
        return "gated" if self.has_gate else "fc"

    @property
    def up_name(self) -> str:
        """Name of the first projection: ``gate_up_proj`` (gated) or ``up_proj`` (Phi-style)."""
        return "gate_up_proj" if self.has_gate else "up_proj"

    @property
    def experts_implementation(self) -> str:
        return self.config.implementation

    @experts_implementation.setter
    def experts_implementation(self, name: str) -> None:
        if name not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation: {name!r} is not one of {', '.join(EXPERTS_IMPLEMENTATIONS)}")
        self.config.implementation = name

    def reset_parameters(self) -> None:
        """Default init for a block built to be loaded into: normal(0, 0.02) weights, zero biases."""
        for name, parameter in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                nn.init.zeros_(parameter)
            else:
                nn.init.normal_(parameter, std=0.02)

    def _expert(self, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens: [n, H] -> [n, H]."""
        up_bias = getattr(self, f"{self.up_name}_bias")[expert] if self.has_bias else None
        projected = F.linear(hidden, getattr(self, self.up_name)[expert], up_bias)
        activated = self._apply_gate(projected) if self.has_gate else self.act_fn(projected)
        down_bias = self.down_proj_bias[expert] if self.has_bias else None
        return F.linear(activated, self.down_proj[expert], down_bias)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_index == expert)
            if token.numel() == 0:
                continue
            contribution = self._expert(expert, hidden_states[token]) * top_k_weights[token, slot, None]
            output.index_add_(0, token, contribution.to(output.dtype))
        return output

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"gated={self.has_gate}, bias={self.has_bias}, implementation={self.experts_implementation}")


# ------------------------------------------------------------------------------------------ the host's FFN


@dataclass
class _DenseFFN:
    """The structure of a host FFN module, detected from its submodules."""

    gated: bool
    bias: bool
    hidden_size: int
    intermediate_size: int
    act_fn: nn.Module
    up: list[nn.Linear]   # [gate_proj, up_proj] or [fc1]
    down: nn.Linear       # down_proj or fc2


def _dense_ffn(ffn: nn.Module, hidden_size: int) -> _DenseFFN:
    name = type(ffn).__name__
    if isinstance(ffn, MoEBlock):
        raise SpecError("cannot upcycle a layer twice: its mlp is already an MoEBlock")
    if all(hasattr(ffn, part) for part in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        up, down, act = [ffn.gate_proj, ffn.up_proj], ffn.down_proj, ffn.act_fn
    elif all(hasattr(ffn, part) for part in ("fc1", "fc2", "activation_fn")):
        up, down, act = [ffn.fc1], ffn.fc2, ffn.activation_fn
    else:
        raise SpecError(f"cannot upcycle {name}: expected gate_proj/up_proj/down_proj + act_fn (Llama, Mistral, "
                        f"Qwen2, StableLM) or fc1/fc2 + activation_fn (Phi)")
    linears = [*up, down]
    if not all(type(linear) is nn.Linear for linear in linears):
        kinds = sorted({type(linear).__name__ for linear in linears})
        raise SpecError(f"cannot upcycle {name}: its projections must be plain nn.Linear, found {kinds} "
                        "(merge LoRA adapters into the model before upcycling)")
    biases = {linear.bias is not None for linear in linears}
    if len(biases) > 1:
        raise SpecError(f"cannot upcycle {name}: some of its projections have a bias and some do not")
    intermediate = up[0].out_features
    if any(linear.in_features != hidden_size for linear in up) or down.in_features != intermediate \
            or down.out_features != hidden_size or any(linear.out_features != intermediate for linear in up):
        raise SpecError(f"cannot upcycle {name}: its projections do not map hidden size {hidden_size} -> "
                        f"{intermediate} -> {hidden_size}")
    return _DenseFFN(gated=len(up) == 2, bias=biases.pop(), hidden_size=hidden_size,
                     intermediate_size=intermediate, act_fn=act, up=up, down=down)


def _check_preserving_is_possible(settings: MoESettings) -> None:
    """Without a shared expert, only identical copies whose weights sum to 1 reproduce the FFN."""
    if settings.init != "preserving" or settings.shared_expert:
        return
    if not settings.renormalize and settings.top_k != settings.num_experts:
        raise SpecError("moe.init: 'preserving' without a shared expert needs renormalize: true "
                        "(the copies' routing weights must sum to 1)")
    if settings.expert_noise:
        raise SpecError("moe.init: 'preserving' without a shared expert needs expert_noise: 0 "
                        "(noisy copies no longer add up to the FFN)")


def _check_router_state(state: dict, num_experts: int, hidden_size: int, *, bias: bool) -> None:
    weight, state_bias = state.get("weight"), state.get("bias")
    if weight is None or tuple(weight.shape) != (num_experts, hidden_size):
        got = None if weight is None else tuple(weight.shape)
        raise SpecError(f"router_state: weight has shape {got}, expected ({num_experts}, {hidden_size}) "
                        f"(num_experts, hidden_size)")
    if state_bias is not None and not bias:
        raise SpecError("router_state: the router has a bias but moe.router_bias is false")
    if state_bias is not None and tuple(state_bias.shape) != (num_experts,):
        raise SpecError(f"router_state: bias has shape {tuple(state_bias.shape)}, expected ({num_experts},)")


def _layer_generator(seed: int, layer_index: int) -> torch.Generator:
    # Distinct streams for up to 100,003 layers per seed.
    return torch.Generator().manual_seed(seed * 100_003 + layer_index)


# -------------------------------------------------------------------------------------------------- block


class MoEBlock(nn.Module):
    """One decoder layer's FFN as a mixture of experts: ``[..., H] -> [..., H]``.

    output = shared_expert(x) [* sigmoid(shared_expert_gate(x))] + sum_k w_k(x) * experts[i_k(x)](x)
    """

    def __init__(self, gate: MoERouter, experts: MoEExperts, shared_expert: nn.Module | None,
                 settings: MoESettings, *, shared_expert_gate: nn.Linear | None = None):
        super().__init__()
        self.settings = settings
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate   # None: no module, no state-dict key
        self.router_logits: torch.Tensor | None = None
        self.dropped_tokens = 0

    # --------------------------------------------------------------------------------------- building

    @classmethod
    def from_dense(cls, ffn: nn.Module, settings: MoESettings, hidden_size: int, *,
                   router_state: dict | None = None, layer_index: int = 0) -> MoEBlock:
        """Upcycle ``ffn`` (taken over: it becomes the shared expert) per ``settings.init``; the router from
        ``router_state`` ({"weight": [E, H], "bias": [E]}) or random, seeded by ``settings.seed`` and
        ``layer_index``."""
        _check_preserving_is_possible(settings)
        dense = _dense_ffn(ffn, hidden_size)
        block = cls._build(ffn, dense, settings)
        generator = _layer_generator(settings.seed, layer_index)
        block._copy_experts_from(dense, generator)
        if router_state is not None:
            block._load_router_state(router_state)
        else:
            block.gate.reset_parameters(generator)
        if settings.shared_expert_gate:
            # sigmoid(0) = 1/2 times a doubled down projection: the shared expert starts as the FFN, exactly.
            with torch.no_grad():
                dense.down.weight.mul_(2)
                if dense.down.bias is not None:
                    dense.down.bias.mul_(2)
        return block

    @classmethod
    def empty(cls, ffn: nn.Module, settings: MoESettings, hidden_size: int) -> MoEBlock:
        """The same structure as ``from_dense`` with default-initialised experts and router, for a checkpoint to
        be loaded into."""
        return cls._build(ffn, _dense_ffn(ffn, hidden_size), settings)

    @classmethod
    def _build(cls, ffn: nn.Module, dense: _DenseFFN, settings: MoESettings) -> MoEBlock:
        reference = dense.down.weight
        like = {"dtype": reference.dtype, "device": reference.device}
        gate = MoERouter(dense.hidden_size, settings.num_experts, settings.top_k, bias=settings.router_bias,
                         renormalize=settings.renormalize, **like)
        config = ExpertsConfig(settings.num_experts, dense.hidden_size, dense.intermediate_size, dense.gated,
                               dense.bias, settings.experts_implementation)
        experts = MoEExperts(config, copy.deepcopy(dense.act_fn), **like)
        shared_gate = None
        if settings.shared_expert_gate:
            shared_gate = nn.Linear(dense.hidden_size, 1, bias=False, **like)
            nn.init.zeros_(shared_gate.weight)
        return cls(gate, experts, ffn if settings.shared_expert else None, settings, shared_expert_gate=shared_gate)

    @torch.no_grad()
    def _copy_experts_from(self, dense: _DenseFFN, generator: torch.Generator) -> None:
        up_weight = torch.cat([linear.weight for linear in dense.up], dim=0)
        copies = {self.experts.up_name: up_weight, "down_proj": dense.down.weight}
        if dense.bias:
            copies[f"{self.experts.up_name}_bias"] = torch.cat([linear.bias for linear in dense.up], dim=0)
            copies["down_proj_bias"] = dense.down.bias
        zero_down = self.settings.init == "preserving" and self.settings.shared_expert
        for name, source in copies.items():
            target = getattr(self.experts, name)
            if zero_down and name.startswith("down_proj"):
                target.zero_()
                continue
            target.copy_(source.unsqueeze(0).expand_as(target))
            if self.settings.expert_noise:
                scale = self.settings.expert_noise * source.float().std().item() if source.numel() > 1 else 0.0
                noise = torch.randn(target.shape, generator=generator) * scale
                target.add_(noise.to(target))

    @torch.no_grad()
    def _load_router_state(self, state: dict) -> None:
        _check_router_state(state, *self.gate.weight.shape, bias=self.gate.bias is not None)
        self.gate.weight.copy_(state["weight"])
        if self.gate.bias is not None and state.get("bias") is not None:
            self.gate.bias.copy_(state["bias"])
        elif self.gate.bias is not None:
            self.gate.bias.zero_()   # a router trained without bias

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits, weights, index = self.gate(flat)
        self.router_logits = logits
        if self.settings.capacity_factor is not None:
            weights = self._drop_over_capacity(index, weights)
        routed = self.experts(flat, index, weights.to(flat.dtype)).view(hidden.shape)
        if self.shared_expert is None:
            return routed
        # The shared expert sees the caller's tensor unchanged, so with zero routed output (preserving init)
        # the block returns exactly what the dense FFN would.
        shared = self.shared_expert(hidden)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
        return shared + routed

    def _drop_over_capacity(self, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Zero the weights of assignments beyond each expert's capacity; first choices go first."""
        tokens, k = index.shape
        experts = self.settings.num_experts
        capacity = math.ceil(self.settings.capacity_factor * tokens * k / experts)
        choice_major = F.one_hot(index.t().reshape(-1), experts)          # [k*T, E]
        queue_position = (choice_major.cumsum(0) * choice_major).sum(-1) - 1
        keep = (queue_position < capacity).view(k, tokens).t()            # [T, k]
        self.dropped_tokens += int((~keep).sum())
        return weights * keep

    @property
    def ffn_layout(self) -> str:
        """``gated`` or ``fc``, the per-expert key layout of this block (see ``register_checkpoint_layout``)."""
        return _base_experts(self).ffn_layout

    def reset_dropped_tokens(self) -> None:
        self.dropped_tokens = 0

    def extra_repr(self) -> str:
        capacity = "dropless" if self.settings.capacity_factor is None else f"capacity={self.settings.capacity_factor}"
        return f"shared_expert={self.shared_expert is not None}, {capacity}"


# ------------------------------------------------------------------------------------- whole-model helpers


def upcycle_layers(decoder_layers: nn.ModuleList, settings: MoESettings, hidden_size: int, *,
                   router_state: dict | None = None) -> list[int]:
    """In place: each chosen layer's ``mlp`` becomes ``MoEBlock.from_dense(layer.mlp, ...)``, seeded by its
    index. Returns the converted indices. Every layer is checked before any is converted."""
    indices = settings.layer_indices(len(decoder_layers))
    _check_preserving_is_possible(settings)
    for index in indices:
        _dense_ffn(_layer_with_mlp(decoder_layers, index).mlp, hidden_size)
    if router_state is not None:
        _check_router_state(router_state, settings.num_experts, hidden_size, bias=settings.router_bias)
    for index in indices:
        layer = decoder_layers[index]
        layer.mlp = MoEBlock.from_dense(layer.mlp, settings, hidden_size, router_state=router_state,
                                        layer_index=index)
    return indices


def build_layers(decoder_layers: nn.ModuleList, settings: MoESettings, hidden_size: int) -> list[int]:
    """In place, for loading: each chosen layer's ``mlp`` becomes ``MoEBlock.empty(layer.mlp, ...)``."""
    indices = settings.layer_indices(len(decoder_layers))
    for index in indices:
        layer = _layer_with_mlp(decoder_layers, index)
        layer.mlp = MoEBlock.empty(layer.mlp, settings, hidden_size)
    return indices


def _layer_with_mlp(decoder_layers: nn.ModuleList, index: int) -> nn.Module:
    layer = decoder_layers[index]
    if not isinstance(getattr(layer, "mlp", None), nn.Module):
        raise SpecError(f"decoder layer {index} ({type(layer).__name__}) has no `mlp` module to convert")
    return layer


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    """Every MoEBlock in ``model`` with its dotted name, in layer order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoEBlock)]


def set_experts_implementation(model: nn.Module, name: str) -> None:
    """Switch every MoE block's experts dispatch (``eager``, ``grouped_mm``, ``batched_mm``)."""
    for _, block in moe_blocks(model):
        _base_experts(block).experts_implementation = name


def _base_experts(block: MoEBlock) -> MoEExperts:
    experts = block.experts
    while not isinstance(experts, MoEExperts):  # PEFT wraps targeted parameters' module in ParamWrapper layers
        experts = experts.base_layer
    return experts


def _recorded_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE blocks")
    missing = [name for name, block in blocks if block.router_logits is None]
    if missing:
        raise ValueError(f"no router logits recorded yet in {missing[0]}: run a forward pass first")
    return blocks


def auxiliary_losses(model: nn.Module, settings: MoESettings,
                     attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The router losses of the model's last forward, unweighted, plus their weighted sum.

    - ``balance``: transformers' ``load_balancing_loss_func`` (Switch Transformer; the Qwen2-MoE/Mixtral form:
      fraction of top-k assignments times mean probability per expert, over all MoE layers' tokens, times E);
    - ``z``: mean over tokens (and layers) of logsumexp(router logits)^2 (ST-MoE);
    - ``total``: ``aux_loss_coef * balance + z_loss_coef * z``.

    With ``attention_mask`` ([B, S], 1 = real token), padded tokens count in neither.
    """
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    logits = tuple(block.router_logits for _, block in _recorded_blocks(model))
    mask = None
    if attention_mask is not None:
        if attention_mask.numel() != logits[0].shape[0]:
            raise ValueError(f"attention_mask has {attention_mask.numel()} positions but the router saw "
                             f"{logits[0].shape[0]} tokens")
        mask = attention_mask.reshape(-1).to(device=logits[0].device, dtype=torch.float32)
    balance = load_balancing_loss_func(logits, settings.num_experts, settings.top_k, attention_mask)
    squared_lse = torch.stack([layer_logits.to(logits[0].device).logsumexp(dim=-1).square()
                               for layer_logits in logits])                 # [layers, T]
    z = squared_lse.mean() if mask is None else (squared_lse * mask).sum() / (mask.sum() * len(logits))
    total = settings.aux_loss_coef * balance + settings.z_loss_coef * z
    return {"balance": balance, "z": z, "total": total}


def routing_counts(model: nn.Module, token_groups: torch.Tensor, *, num_groups: int | None = None) -> torch.Tensor:
    """[moe_layers, groups, experts] counts of the experts chosen (top-k, each choice counted) for each group's
    tokens in the last forward. ``token_groups`` ([B*S] or [B, S]) holds a group id per token, e.g. its
    sample's domain; -1 ignores the token. ``num_groups`` defaults to the largest id + 1."""
    blocks = _recorded_blocks(model)
    groups = token_groups.reshape(-1).long().cpu()
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if groups.numel() else 0
    if groups.numel() and int(groups.max()) >= num_groups:
        raise ValueError(f"token_groups has id {int(groups.max())} but num_groups is {num_groups}")
    if len({block.gate.num_experts for _, block in blocks}) > 1:
        raise ValueError("the MoE layers have different numbers of experts")
    valid = groups >= 0
    counts = []
    for name, block in blocks:
        logits = block.router_logits.detach()
        if logits.shape[0] != groups.numel():
            raise ValueError(f"token_groups has {groups.numel()} entries but {name} routed {logits.shape[0]} tokens")
        experts = block.gate.num_experts
        # The router's own choice: top-k of the softmax probabilities.
        choices = logits.float().softmax(-1).topk(block.gate.top_k, dim=-1).indices.cpu()[valid]   # [V, k]
        cells = groups[valid].unsqueeze(-1) * experts + choices
        counts.append(torch.bincount(cells.reshape(-1), minlength=num_groups * experts).view(num_groups, experts))
    return torch.stack(counts)


# ---------------------------------------------------------------------------------------------- router files


def save_router(path: str | Path, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Write a trained router ({"weight": [E, H], "bias": [E]}) as safetensors."""
    from safetensors.torch import save_file

    _check_router_tensors(str(path), weight, bias)
    tensors = {"weight": weight.detach().float().cpu().contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().float().cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "content": "medtune moe router"})


def load_router(path: str | Path, *, num_experts: int | None = None, hidden_size: int | None = None) -> dict:
    """A trained router as {"weight": [E, H] float32, "bias": [E] float32 or None}.

    Reads medtune's safetensors files ({"weight", "bias"}) and Med-MoE's ``*.pth`` router files
    ({"fc1.weight", "fc1.bias"}), the latter with ``torch.load(weights_only=True)``: tensors only, no arbitrary
    object is unpickled. ``num_experts``/``hidden_size`` check the shapes against the model.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: router file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise SpecError(f"{path}: not a readable safetensors file ({error})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle and zip errors, and weights_only refusals
            raise SpecError(f"{path}: not a router file readable without unpickling code "
                            f"(torch.load weights_only: {str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"{path}: expected a mapping of tensors, got {type(state).__name__}")
    keys = set(state)
    for prefix in ("", "fc1."):
        if {f"{prefix}weight"} <= keys <= {f"{prefix}weight", f"{prefix}bias"}:
            weight, bias = state[f"{prefix}weight"], state.get(f"{prefix}bias")
            break
    else:
        raise SpecError(f"{path}: expected keys weight (+ bias) or Med-MoE's fc1.weight (+ fc1.bias), "
                        f"found {sorted(keys)}")
    _check_router_tensors(str(path), weight, bias)
    if num_experts is not None and weight.shape[0] != num_experts:
        raise SpecError(f"{path}: the router has {weight.shape[0]} outputs but the model has {num_experts} experts")
    if hidden_size is not None and weight.shape[1] != hidden_size:
        raise SpecError(f"{path}: the router reads hidden size {weight.shape[1]} but the model's is {hidden_size}")
    return {"weight": weight.float(), "bias": None if bias is None else bias.float()}


def _check_router_tensors(where: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2:
        raise SpecError(f"{where}: router weight must be [experts, hidden], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise SpecError(f"{where}: router bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


# ------------------------------------------------------------------------------------------ checkpoint layout


_REGISTERED_LAYOUTS: dict[str, str] = {}


def register_checkpoint_layout(model_class_name: str, ffn_layout: str = "gated") -> None:
    """Make ``save_pretrained`` write the experts of ``model_class_name`` models one key per expert, and
    ``from_pretrained`` fuse them back, by registering a transformers weight-conversion mapping by class name.

    ``ffn_layout`` names the per-expert keys: ``gated`` -> ``mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``
    (+ ``.bias``), as transformers 4.x Qwen2-MoE and vLLM; ``fc`` (Phi) -> ``mlp.experts.{e}.fc1|fc2.weight|bias``
    (``MoEBlock.ffn_layout`` tells which). Both layouts fuse into a parameter named ``down_proj``, so on saving
    the mapping cannot tell them apart: one class name holds one layout. A model class that can host either kind
    of LLM should register its inner LLM's class instead (e.g. ``PhiModel`` with ``fc``; transformers applies a
    sub-model's mapping under its prefix), and not also itself: a root mapping and an inner one with different
    layouts in one model write down projections that do not load back.
    Registering the same name and layout again does nothing; existing mappings for the name are kept.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    if ffn_layout not in FFN_LAYOUTS:
        raise ValueError(f"ffn_layout: {ffn_layout!r} is not one of {', '.join(FFN_LAYOUTS)}")
    previous = _REGISTERED_LAYOUTS.get(model_class_name)
    if previous == ffn_layout:
        return
    if previous is not None:
        raise ValueError(f"{model_class_name} already has the {previous!r} expert layout registered")
    existing = get_checkpoint_conversion_mapping(model_class_name) or []
    register_checkpoint_conversion_mapping(model_class_name, [*existing, *_expert_converters(ffn_layout)],
                                           overwrite=True)
    _REGISTERED_LAYOUTS[model_class_name] = ffn_layout



def register_expert_layout(language_model: nn.Module) -> None:
    """Per-expert keys on disk for this LLM's class, in the FFN layout of its MoE blocks (gated, or fc for Phi)."""
    blocks = moe_blocks(language_model)
    if blocks:
        register_checkpoint_layout(type(language_model).__name__, blocks[0][1].ffn_layout)

def _expert_converters(ffn_layout: str) -> list:
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    def stack(per_expert: str, fused: str) -> WeightConverter:
        return WeightConverter(f"mlp.experts.*.{per_expert}", f"mlp.experts.{fused}", operations=[MergeModulelist(0)])

    if ffn_layout == "fc":
        return [stack("fc1.weight", "up_proj"), stack("fc1.bias", "up_proj_bias"),
                stack("fc2.weight", "down_proj"), stack("fc2.bias", "down_proj_bias")]
    converters = []
    for suffix in ("weight", "bias"):
        fused = "" if suffix == "weight" else "_bias"
        converters.append(WeightConverter([f"mlp.experts.*.gate_proj.{suffix}", f"mlp.experts.*.up_proj.{suffix}"],
                                          f"mlp.experts.gate_up_proj{fused}",
                                          operations=[MergeModulelist(0), Concatenate(1)]))
        converters.append(stack(f"down_proj.{suffix}", f"down_proj{fused}"))
    return converters
