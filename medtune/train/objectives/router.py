"""``router``: fit a domain classifier on the model's hidden states and save it as an MoE router file.

The model does not change and no model is written: the next stage starts from the last stage that wrote one,
and an MoE stage names this stage's router file with ``moe.router: stage:NAME``. The fitting itself, its
settings and its report are :mod:`medtune.train.router`'s (Med-MoE trains its router before stage 3).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

from medtune.train.objectives.base import Objective, StageContext


class RouterFit(Objective):
    name: ClassVar[str] = "router"
    trains_with_trainer: ClassVar[bool] = False
    writes_model: ClassVar[bool] = False

    def problems(self, stage, where: str) -> list[str]:
        problems = super().problems(stage, where)
        problems += [f"{where}.{key}: a router stage trains only the router; remove {key}"
                    for key in ("moe", "lora") if getattr(stage, key) is not None]
        if any(getattr(stage.lr, f.name) for f in dataclasses.fields(stage.lr)):
            problems.append(f"{where}.lr: a router stage trains no part of the model (its own rate is router.lr); "
                            "remove lr")
        if stage.packing:
            problems.append(f"{where}.packing: a router stage reads one sample at a time; remove packing")
        return problems

    def finished(self, directory: Path) -> bool:
        from medtune.train.router import ROUTER_FILE

        return (directory / ROUTER_FILE).is_file() and (directory / "summary.json").is_file()

    def fit(self, context: StageContext) -> dict[str, Any]:
        """Fit the router on the stage's data (main process only) into the stage folder, written atomically."""
        from medtune.data.jsonl import Tally
        from medtune.train import checkpoints
        from medtune.train.data import iter_stage_samples
        from medtune.train.router import ROUTER_FILE, RouterTraining, train_router

        stage, started = context.stage, time.monotonic()
        context.vlm.model.eval()
        tally = Tally()
        with checkpoints.atomic_directory(context.directory) as staging:
            report = train_router(context.vlm, iter_stage_samples(stage.data, tally, seed=context.recipe.seed),
                                  stage.router or RouterTraining(), staging, tally=tally, strict=stage.data.strict)
            fields = {"samples": report["train"]["samples"], "seconds": time.monotonic() - started,
                      "skipped": dict(tally.skipped), "skipped_examples": dict(tally.examples),
                      "router": {"file": str(context.directory / ROUTER_FILE), "accuracy": report["accuracy"],
                                 "majority_accuracy": report["majority_accuracy"], "classes": report["classes"]}}
            context.write_summary(staging, fields)   # inside the folder that appears whole, or not at all
        return fields

    def result_line(self, result) -> str:
        if result.router is None:   # a finished stage whose summary is gone
            return result.line()
        skipped = sum(result.skipped.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in result.skipped.items())
        router = result.router
        return (f"stage {result.stage}: router on {result.samples} samples ({', '.join(router['classes'])}), "
                f"held-out accuracy {router['accuracy']:.1%} (majority class {router['majority_accuracy']:.1%}), "
                f"{skipped} samples skipped{f' ({reasons})' if reasons else ''}, {result.seconds:.1f}s; "
                f"router: {router['file']}")
