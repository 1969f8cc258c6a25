"""Settings of an upcycled mixture of experts (a recipe stage's ``moe`` section), in plain Python (no torch).

They are read by the recipe (checked before any work starts), by :mod:`medtune.models.moe.layers` (the layers) and
saved in the model's config, so a checkpoint carries how its experts were made. Two presets:

``default``
    experts on every other layer from layer 0, 4 experts, top-1, a shared expert at weight 1, raw (not
    renormalised) routing weights, no token dropped, function-preserving initialisation (the upcycled model
    starts with exactly the dense model's outputs), a router with bias, trained from random.
``med-moe``
    Med-MoE's stage 3 (jiangsongtao/Med-MoE, a MoE-LLaVA fork; ``llava_stablelm_moe.py`` / ``moe/layer.py``,
    ``moe/sharded_moe.py`` at 148cbd6): the same layers, experts and routing, but experts that are exact copies of
    the stage-2 FFN with the FFN kept as the ungated shared ("meta") expert, so a layer starts at (1 + p)·FFN(x)
    (not function preserving), and a router loaded from a trained domain-router file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


LAYER_MODES = ("sparse", "first_half", "second_half", "dense")
INITS = ("faithful", "preserving")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
PRESETS = ("default", "med-moe")


@dataclass
class MoESettings:
    """How a dense LLM's FFNs become mixtures of experts (one docstring per field; checked on creation)."""

    layers: str | list[int] = "sparse"
    """``sparse`` (every ``every``-th layer from ``offset``), ``first_half``, ``second_half``, ``dense``, or
    explicit layer indices."""
    every: int = 2
    """sparse: the step between MoE layers."""
    offset: int = 0
    """sparse: the first MoE layer (Med-MoE and MoE-LLaVA's sparse mode: layers 0, 2, 4 ...)."""
    num_experts: int = 4
    top_k: int = 1
    shared_expert: bool = True
    """Keep the dense FFN as an always-on shared ("meta") expert added to the routed output."""
    shared_expert_gate: bool = False
    """False: the shared expert has weight 1 (Med-MoE); True: sigmoid(Linear(hidden, 1)) as Qwen2-MoE."""
    renormalize: bool = False
    """Renormalise the top-k routing weights to sum to 1 (Med-MoE: the chosen expert's softmax probability)."""
    capacity_factor: float | None = None
    """None: dropless (no token is ever dropped); else each expert takes at most
    ceil(factor * tokens * top_k / experts) tokens and the overflow is dropped and counted."""
    aux_loss_coef: float = 0.0
    """Weight of the load-balancing loss (Med-MoE computes it and weights it 0)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean squared log-sum-exp of the router logits)."""
    init: str = "preserving"
    """``faithful``: experts are exact copies of the FFN (Med-MoE; with the shared expert a layer starts at
    (1 + p)·FFN(x)); ``preserving``: at step 0 every layer's output equals the dense FFN's."""
    expert_noise: float = 0.0
    """Std of Gaussian noise added to each expert copy, relative to each weight's std (0: exact copies)."""
    router_bias: bool = True
    """Med-MoE's router is Linear(hidden, experts, bias=True)."""
    experts_implementation: str = "grouped_mm"
    """transformers' experts kernels: ``eager`` (a loop over experts), ``grouped_mm``, ``batched_mm``."""
    seed: int = 0
    """Seed of everything that starts random (router, expert noise)."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            if self.layers not in LAYER_MODES:
                raise ValueError(f"moe.layers: {self.layers!r} is not one of {', '.join(LAYER_MODES)} "
                                 "or a list of layer indices")
        elif not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"moe.layers: expected a mode or a non-empty list of layer indices, got {self.layers!r}")
        elif len(set(self.layers)) != len(self.layers):
            raise ValueError(f"moe.layers: layer indices repeat in {self.layers}")
        for name in ("every", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"moe.{name}: must be a positive integer, got {value!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"moe.offset: must be an integer >= 0, got {self.offset!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k: {self.top_k} is more than num_experts {self.num_experts}")
        if self.capacity_factor is not None and not (isinstance(self.capacity_factor, (int, float))
                                                     and self.capacity_factor > 0):
            raise ValueError(f"moe.capacity_factor: must be > 0 or null (dropless), got {self.capacity_factor!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "expert_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"moe.{name}: must be a number >= 0, got {value!r}")
        if self.init not in INITS:
            raise ValueError(f"moe.init: {self.init!r} is not one of {', '.join(INITS)}")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"moe.experts_implementation: {self.experts_implementation!r} is not one of "
                             f"{', '.join(EXPERTS_IMPLEMENTATIONS)}")
        if self.shared_expert_gate and not self.shared_expert:
            raise ValueError("moe.shared_expert_gate: there is no shared expert to gate (shared_expert is false)")

    def layer_indices(self, num_layers: int) -> list[int]:
        """The decoder layers that get experts, for a model with ``num_layers`` layers."""
        if isinstance(self.layers, list):
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"moe.layers: {bad} are not layers of a {num_layers}-layer model "
                                 f"(0..{num_layers - 1})")
            return sorted(self.layers)
        if self.layers == "sparse":
            if self.offset >= num_layers:
                raise ValueError(f"moe.offset: {self.offset} is past the last layer ({num_layers - 1})")
            return list(range(self.offset, num_layers, self.every))
        if self.layers == "first_half":
            return list(range(num_layers // 2))
        if self.layers == "second_half":
            return list(range(num_layers // 2, num_layers))
        return list(range(num_layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> MoESettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"moe: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        return cls(**settings)

    @classmethod
    def preset(cls, name: str, **changes) -> MoESettings:
        """A preset (see the module docstring) with ``changes`` on top."""
        if name not in PRESETS:
            raise ValueError(f"moe.preset: {name!r} is not one of {', '.join(PRESETS)}")
        base = {} if name == "default" else MED_MOE
        return cls.from_dict({**base, **changes})


# Med-MoE stage 3 (facts from jiangsongtao/Med-MoE at 148cbd6): sparse layers 0, 2, 4 ... (llava_stablelm_moe.py
# moe_mode), 4 experts, top-1 (finetune_moe.sh), the stage-2 FFN deep-copied into the experts and kept as the
# meta expert summed with weight 1 (moe/layer.py), the softmax probability as routing weight (sharded_moe.py
# top1gating), drop_tokens=False, router Linear with bias, aux loss weight 0.
MED_MOE = {"layers": "sparse", "every": 2, "offset": 0, "num_experts": 4, "top_k": 1, "shared_expert": True,
           "shared_expert_gate": False, "renormalize": False, "capacity_factor": None, "aux_loss_coef": 0.0,
           "z_loss_coef": 0.0, "init": "faithful", "expert_noise": 0.0, "router_bias": True}
