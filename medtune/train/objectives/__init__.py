"""Training objectives: what a stage optimises, one object per method.

A stage names its method with ``method:`` (``sft`` by default; a stage with a ``router`` section and no
method is a ``router`` stage, as recipes wrote them before methods had names). The stage runner
(:mod:`medtune.train.run`) does what every method shares: the stage's model and template, experts, trainable
parts and LoRA, Trainer with its schedule, precision and engines, checkpoints and resume, the model it saves.
The objective owns what differs (:class:`medtune.train.objectives.base.Objective`):

==================  =====================================================================================
question            asked of the objective
==================  =====================================================================================
its settings        :meth:`~Objective.problems`: recipe validation of what the method reads and refuses
does it train?      :attr:`~Objective.trains_with_trainer` (False: its own loop, :meth:`~Objective.fit`)
a model for later?  :attr:`~Objective.writes_model` (the next stage starts from the last that wrote one)
finished?           :meth:`~Objective.finished`
data                :meth:`~Objective.dataset`: a stage's data encoded (the token cache, or pairs for DPO,
                    SimPO and ORPO)
rows                :meth:`~Objective.rows`: encoded stage data -> what Trainer's data loader yields
collator            :meth:`~Objective.collator`: the kind's collator, wrapped where the method needs more
loss                :meth:`~Objective.loss`: the loss of a batch (the model kind adds its own extra losses,
                    such as the experts' router losses, whatever the objective)
before the first step :meth:`~Objective.prepare` (DPO's reference model)
report              :meth:`~Objective.write_report`, :meth:`~Objective.result_line`, :meth:`~Objective.pop_metrics`
==================  =====================================================================================

Adding a method means one module here with one ``Objective`` subclass and one line in :data:`METHODS`.
"""
from __future__ import annotations

import importlib

from medtune.train.objectives.base import Objective, StageContext

# method name -> "module:class"; imported when a stage of that method runs or is checked
METHODS = {
    "sft": "medtune.train.objectives.sft:SFT",
    "router": "medtune.train.objectives.router:RouterFit",
    "dpo": "medtune.train.objectives.dpo:DPO",
    "simpo": "medtune.train.objectives.simpo:SimPO",
    "orpo": "medtune.train.objectives.orpo:ORPO",
    "grpo": "medtune.train.objectives.grpo:GRPO",
}
DEFAULT_METHOD = "sft"


def method_of(stage) -> str:
    """The stage's method: ``method``, else ``router`` for a stage with a router section, else ``sft``."""
    if stage.method is not None:
        return stage.method
    return "router" if stage.router is not None else DEFAULT_METHOD


def objective_for(stage) -> Objective:
    """The objective of ``stage``'s method (ValueError for an unknown one)."""
    name = method_of(stage)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    module, _, attribute = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)()


__all__ = ["DEFAULT_METHOD", "METHODS", "Objective", "StageContext", "method_of", "objective_for"]
