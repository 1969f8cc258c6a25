"""``orpo``: ORPO, supervised fine-tuning and preference in one loss, without a reference model (Hong, Lee and
Thorne, 2024).

The data, batches and limits are DPO's (:class:`medtune.train.objectives.dpo.PairObjective`). With ``p`` a
reply's average log-probability per labelled token, the odds of a reply are ``exp(p) / (1 - exp(p))`` and::

    loss = NLL(chosen) - beta * mean over pairs of log sigmoid(log odds(chosen) - log odds(rejected))

where NLL(chosen) is the cross-entropy of the chosen replies' labelled tokens, averaged over those tokens of the
batch (the paper's SFT term; TRL's ``ORPOTrainer`` takes the prompt's tokens into it too). The odds-ratio term is
TRL's ``odds_ratio_loss`` (``beta`` being the paper's lambda, default 0.1; written here rather than called, as
for SimPO, and checked against TRL's on fixed logits); the model kind's extra losses (the experts' router losses)
are added. ``log(1 - exp(p))`` is computed without
cancellation, and a reply the model is certain of (``p`` within 1e-12 of 0, where the odds are infinite) is
taken at ``p = -1e-12``. Logged: ``nll_loss``, ``log_odds_ratio`` (the mean log sigmoid term),
``log_odds_chosen`` (the mean log odds ratio), and ``rewards/*`` (beta times the average log-probability), as
TRL names them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from medtune.train.objectives.dpo import PairObjective
from medtune.validation import Number, section


@section
@dataclass
class ORPOSettings:
    """An ORPO stage's ``orpo`` section."""

    beta: Number = 0.1
    """Weight of the odds-ratio term beside the chosen replies' NLL (the paper's lambda)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: must be a number > 0, got {self.beta!r}")


def log1mexp(x):
    """``log(1 - exp(x))`` for x < 0, accurate near 0 and for very negative x."""
    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPO(PairObjective):
    name: ClassVar[str] = "orpo"
    a_stage: ClassVar[str] = "an ORPO stage"

    def __init__(self) -> None:
        self.beta = ORPOSettings().beta

    def settings(self, stage) -> ORPOSettings:
        return stage.orpo if stage.orpo is not None else ORPOSettings()

    def prepare(self, vlm, model, stage) -> None:
        self.beta = self.settings(stage).beta

    def loss(self, vlm, model, inputs: dict[str, Any], num_items_in_batch=None, speedups=None):
        import torch

        from medtune.models.kinds.base import per_row

        token_logps, rows, extra = self.policy_token_logps(vlm, model, inputs, speedups)
        n_rows = inputs["labels"].shape[0]
        pairs = n_rows // 2
        mean = per_row(token_logps, rows, n_rows, mean=True).clamp(max=-1e-12)
        chosen, rejected = mean[:pairs], mean[pairs:]
        nll = -token_logps[rows < pairs].mean()
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = torch.nn.functional.logsigmoid(log_odds)
        loss = nll - self.beta * ratio.mean()
        if extra is not None:
            loss = loss + extra
        if model.training:
            self.record({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
            self.record_rewards(self.beta * chosen, self.beta * rejected)
        return loss, {"loss": loss}
