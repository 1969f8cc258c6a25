"""The objective interface (see :mod:`medtune.train.objectives` for what each method answers)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

MODEL_DIR = "model"
SECTIONS = {"router": "router", "dpo": "dpo", "simpo": "simpo", "orpo": "orpo", "grpo": "grpo"}
"""A stage's settings sections that belong to one method each (section -> method)."""


@dataclass
class StageContext:
    """What a method with its own loop (:meth:`Objective.fit`) is given by the stage runner."""

    recipe: Any
    index: int
    directory: Path
    vlm: Any
    model_path: Path | None
    """Where ``vlm`` was loaded from (None: built in memory)."""
    write_summary: Callable[[Path, dict], None]
    """Writes the stage's summary.json into a folder, from the summary fields the method filled."""

    @property
    def stage(self):
        return self.recipe.stages[self.index]


class Objective:
    """One training method. The defaults are supervised fine-tuning's (the ``sft`` objective is this class)."""

    name: ClassVar[str] = "sft"
    trains_with_trainer: ClassVar[bool] = True
    """Whether the stage runs Trainer with this objective's rows, collator and loss (else :meth:`fit`)."""
    token_normalised: ClassVar[bool] = True
    """Whether :meth:`loss` divides a sum over labelled tokens by the accumulated batch's count, as transformers'
    own losses do (Trainer then neither averages over accumulation steps nor rescales across processes); False:
    a mean per micro-batch, which Trainer divides by the accumulation steps."""
    writes_model: ClassVar[bool] = True
    """Whether a finished stage leaves ``model/``, the model the next stage starts from."""

    # ---- settings ---------------------------------------------------------------------------------------

    def problems(self, stage, where: str) -> list[str]:
        """What is wrong with ``stage``'s settings for this method (recipe validation; ``where`` is the key
        path of the stage, e.g. ``stages[2]``). A section of another method is refused by name."""
        return [f"{where}.{section}: a {section} section belongs to method {method}, not {self.name}; remove it or "
                f"set method: {method}" for section, method in SECTIONS.items()
                if method != self.name and getattr(stage, section) is not None]

    # ---- the stage's folder -----------------------------------------------------------------------------

    def finished(self, directory: Path) -> bool:
        """Whether the stage in ``directory`` is done (a training stage: its ``model/`` exists)."""
        return (directory / MODEL_DIR).is_dir()

    # ---- training with Trainer --------------------------------------------------------------------------

    def dataset(self, spec, vlm, *, max_length: int, seed: int, cache_dir, progress: bool = True):
        """(dataset, tally): the stage's data encoded by the model's kind (through the token cache where the
        kind's samples are cacheable)."""
        from medtune.train.data import stage_dataset

        return stage_dataset(spec, vlm, max_length=max_length, seed=seed, cache_dir=cache_dir, progress=progress)

    def rows(self, dataset, stage):
        """The encoded stage data as the rows Trainer's data loader reads: the samples, or (packing) rows of
        samples planned to fill ``max_length``."""
        if not stage.packing:
            return dataset
        from medtune.models.packing import PackedDataset

        return PackedDataset(dataset, stage.max_length, lengths=dataset.lengths)

    def collator(self, collator, vlm):
        """The batch collator: the kind's (padding or packing), unchanged for SFT."""
        return collator

    def loss(self, vlm, model, inputs: dict[str, Any], num_items_in_batch=None, speedups=None):
        """(loss, outputs) of a training batch: the causal-LM loss of the labelled tokens, plus what the
        kind adds to every objective (:meth:`VLM.auxiliary_loss <medtune.models.kinds.base.VLM.auxiliary_loss>`)."""
        return vlm.training_loss(model, inputs, num_items_in_batch, speedups=speedups)

    def count_tokens(self, dataset) -> tuple[int, int]:
        """(all tokens, trained tokens) of the encoded stage data, for the stage's summary."""
        from medtune.train.data import count_tokens

        return count_tokens(dataset)

    def prepare(self, vlm, model, stage) -> None:
        """Called once before the first step (and before a resumed run loads its checkpoint): what the method
        keeps of the starting model (nothing for SFT)."""

    def record(self, values: dict[str, Any]) -> None:
        """Add one training batch's metrics (numbers or 0-d tensors) to those :meth:`pop_metrics` averages."""
        metrics = self.__dict__.setdefault("_metrics", {})
        for name, value in values.items():
            metrics.setdefault(name, []).append(float(value.detach() if hasattr(value, "detach") else value))

    def pop_metrics(self) -> dict[str, float]:
        """Metrics the method logs beside the loss, averaged since the last log (none for SFT)."""
        metrics = self.__dict__.pop("_metrics", {})
        return {name: sum(values) / len(values) for name, values in metrics.items() if values}

    def pop_input_tokens(self) -> int:
        """Tokens the method fed the model since the last call beyond the batch Trainer counted (the answers a
        method samples itself); none for SFT."""
        return 0

    def write_report(self, vlm, directory: Path) -> None:
        """What the stage adds to its folder beside the summary (the kind's report, e.g. expert usage)."""
        vlm.write_stage_report(directory)

    def result_line(self, result) -> str:
        """The one line printed for a finished stage."""
        return result.line()

    # ---- methods with a loop of their own ---------------------------------------------------------------

    def fit(self, context: StageContext) -> dict[str, Any]:
        """Run the stage without Trainer; returns the summary fields it fills (only where
        :attr:`trains_with_trainer` is False)."""
        raise NotImplementedError(f"method {self.name} trains with Trainer")
