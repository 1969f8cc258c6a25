"""Objectives as objects: a stage's ``method`` picks one; the recipe checks its settings through it, the stage
runner trains with its loss, and a router stage is the ``router`` objective, named or implied by its section."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medtune.train.objectives import METHODS, method_of, objective_for
from medtune.train.objectives.sft import SFT
from medtune.train.recipe import RecipeError, parse_recipe

ROUTER = {"label": "organ", "epochs": 2}


def _raw(**stage) -> dict:
    return {"model": "some/model", "output_dir": "runs/x",
            "stages": [{"name": "s", "data": {"path": "x.jsonl"}, "lr": {"projector": 1e-3}, **stage}]}


def _error(raw: dict) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    return str(info.value)


def test_a_stage_names_its_method_and_sft_is_the_default():
    assert method_of(parse_recipe(_raw()).stages[0]) == "sft"
    assert method_of(parse_recipe(_raw(method="sft")).stages[0]) == "sft"
    implied = parse_recipe({**_raw(), "stages": [{"name": "r", "data": {"path": "x"}, "router": ROUTER}]})
    named = parse_recipe({**_raw(), "stages": [{"name": "r", "data": {"path": "x"}, "router": ROUTER,
                                                 "method": "router"}]})
    assert method_of(implied.stages[0]) == method_of(named.stages[0]) == "router"
    assert type(objective_for(implied.stages[0])) is type(objective_for(named.stages[0]))


def test_an_unknown_method_and_a_section_of_another_method_are_named():
    assert _error(_raw(method="sfft")) == "stages[0].method: unknown method 'sfft' (did you mean sft?)"
    assert _error(_raw(method="sft", router=ROUTER)) == (
        "stages[0].router: a router section belongs to method router, not sft; remove it or set method: router")
    assert "stages[0].lr: a router stage trains no part of the model" in _error(_raw(method="router"))


def test_no_stage_runner_or_recipe_check_tests_for_the_router_stage():
    """The router stage is an objective: run.py and recipe.py ask the objective, never the stage's section."""
    root = Path(__file__).resolve().parents[2] / "medtune" / "train"
    for name in ("run.py", "recipe.py"):
        source = (root / name).read_text(encoding="utf-8")
        assert not re.search(r"\.router is (not )?None|stage\.router\b", source), name


class _Halved(SFT):
    """SFT at half the loss: the gradients halve, and so does every logged loss."""

    name = "halved"

    def loss(self, vlm, model, inputs, num_items_in_batch=None, speedups=None):
        loss, outputs = super().loss(vlm, model, inputs, num_items_in_batch, speedups)
        return loss * 0.5, outputs


@pytest.mark.slow
def test_the_stage_trains_with_its_objective_s_loss(tmp_path, monkeypatch):
    """The same stage under sft and under an objective whose loss is half of sft's: the first step's logged loss
    halves (same data, same initial weights)."""
    pytest.importorskip("torch")
    import sys
    import types

    from medtune.train.run import read_metrics, run_recipe

    module = types.ModuleType("halved_objective")
    module.Halved = _Halved
    monkeypatch.setitem(sys.modules, "halved_objective", module)
    monkeypatch.setitem(METHODS, "halved", "halved_objective:Halved")
    losses = {}
    for method in ("sft", "halved"):
        recipe = parse_recipe({
            "model": {"preset": "tiny"}, "output_dir": str(tmp_path / method), "report_to": ["none"],
            "cache_dir": str(tmp_path / "cache"),
            "stages": [{"name": "s", "method": method, "data": {"path": "bundled:vqa_rad/trainset.json",
                                                                "format": "vqa-rad", "limit": 8},
                        "lr": {"projector": 1e-3}, "max_steps": 1, "batch_size": 4, "log_steps": 1,
                        "max_length": 256}]})
        run_recipe(recipe)
        metrics = read_metrics(tmp_path / method / "stage-0-s" / "metrics.jsonl")
        losses[method] = next(m["loss"] for m in metrics if "loss" in m)
        summary = json.loads((tmp_path / method / "stage-0-s" / "summary.json").read_text())
        assert summary["method"] == method
    assert losses["halved"] == pytest.approx(losses["sft"] / 2, rel=1e-5)
