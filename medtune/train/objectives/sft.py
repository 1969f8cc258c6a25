"""``sft``: supervised fine-tuning, the causal-LM loss of the assistant replies (the default method).

Everything it does is the :class:`~medtune.train.objectives.base.Objective` default: rows are the encoded
samples (packed or not), batches the kind's collator, the loss the kind's training loss (the labelled-positions
speed-up included, the experts' router losses added), the report the kind's stage report.
"""
from __future__ import annotations

from typing import ClassVar

from medtune.train.objectives.base import Objective


class SFT(Objective):
    name: ClassVar[str] = "sft"
