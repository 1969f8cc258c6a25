"""``simpo``: SimPO, preference optimisation without a reference model (Meng, Xia and Chen, 2024).

The data, batches and limits are DPO's (:class:`medtune.train.objectives.dpo.PairObjective`). The implicit reward
of a reply is its *average* log-probability per labelled token, scaled by ``beta``, and the chosen reply must beat
the rejected one by a margin ``gamma``::

    -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma)

averaged over the pairs of the batch; the model kind's extra losses (the experts' router losses) are added. This
is TRL's ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0`` and no label smoothing (its ``simpo_gamma``
is ``gamma`` here; TRL's function is not called: TRL is not a medtune dependency, its trainer owns batching that
medtune's kinds do here, and given the kind's per-row log-probabilities the loss is one line, checked against
TRL's on fixed logits in ``tests/train/test_preference_losses.py``). No reference model is kept, so a SimPO
stage needs no second copy of the model and one forward pass per batch. Logged as TRL names them:
``rewards/chosen``, ``rewards/rejected`` (beta times the average log-probability), ``rewards/margins``,
``rewards/accuracies``.

Defaults: ``beta`` 2.0 and ``gamma`` 1.0 (a gamma-to-beta ratio of 0.5), the setting SimPO's authors use for
Llama-3-8B (their repository, princeton-nlp/SimPO); TRL's defaults (beta 0.1, gamma 0.5) are CPO's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from medtune.train.objectives.dpo import PairObjective
from medtune.validation import Number, section


@section
@dataclass
class SimPOSettings:
    """A SimPO stage's ``simpo`` section."""

    beta: Number = 2.0
    """Scale of the implicit reward (the average log-probability of a reply)."""
    gamma: Number = 1.0
    """The margin by which the chosen reply's reward should exceed the rejected one's."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: must be a number > 0, got {self.beta!r}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma: must be a number >= 0, got {self.gamma!r}")


class SimPO(PairObjective):
    name: ClassVar[str] = "simpo"
    a_stage: ClassVar[str] = "a SimPO stage"

    def __init__(self) -> None:
        self.beta, self.gamma = SimPOSettings().beta, SimPOSettings().gamma

    def settings(self, stage) -> SimPOSettings:
        return stage.simpo if stage.simpo is not None else SimPOSettings()

    def prepare(self, vlm, model, stage) -> None:
        settings = self.settings(stage)
        self.beta, self.gamma = settings.beta, settings.gamma

    def loss(self, vlm, model, inputs: dict[str, Any], num_items_in_batch=None, speedups=None):
        import torch

        from medtune.models.kinds.base import per_row

        token_logps, rows, extra = self.policy_token_logps(vlm, model, inputs, speedups)
        rewards = self.beta * per_row(token_logps, rows, inputs["labels"].shape[0], mean=True)
        pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        loss = -torch.nn.functional.logsigmoid(chosen - rejected - self.gamma).mean()
        if extra is not None:
            loss = loss + extra
        if model.training:
            self.record_rewards(chosen, rejected)
        return loss, {"loss": loss}
