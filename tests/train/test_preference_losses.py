"""SimPO and ORPO: the losses equal TRL's on the same logits (fixtures/trl_preference), and a recipe checks their
settings as it checks DPO's."""
from __future__ import annotations

import functools
import json
import math
import types
from pathlib import Path

import pytest

from medtune.train.recipe import RecipeError, parse_recipe

torch = pytest.importorskip("torch")

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trl_preference" / "trl_losses.json").read_text())


class _Model:
    """A model in training whose forward pass gives the fixture's logits."""

    training = True

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, **inputs):
        return types.SimpleNamespace(logits=self.logits)


def _loss(objective, settings):
    """The objective's loss and logged metrics on the fixture's logits, through VLM.labelled_token_logps."""
    from medtune.models.kinds.base import VLM, Speedups

    logits, labels = torch.tensor(FIXTURE["logits"]), torch.tensor(FIXTURE["labels"])
    vlm = types.SimpleNamespace(experts=None, auxiliary_loss=lambda model, inputs: None,
                                exact_speedups=lambda: Speedups(), prepare_training_inputs=lambda m, i, s: dict(i))
    vlm.labelled_token_logps = functools.partial(VLM.labelled_token_logps, vlm)
    model = _Model(logits)
    objective.prepare(vlm, model, settings)
    loss, _ = objective.loss(vlm, model, {"input_ids": torch.zeros_like(labels), "labels": labels})
    return float(loss), objective.pop_metrics()


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (0.5, 0.0)])
def test_simpo_equals_trl_s_cpo_trainer_with_the_simpo_loss(beta, gamma):
    from medtune.train.objectives.simpo import SimPO, SimPOSettings

    loss, metrics = _loss(SimPO(), types.SimpleNamespace(simpo=SimPOSettings(beta=beta, gamma=gamma)))
    trl = FIXTURE[f"simpo beta={beta} gamma={gamma}"]
    assert loss == pytest.approx(trl["loss"], rel=1e-6)
    for name in ("rewards/chosen", "rewards/rejected"):
        assert metrics[name] == pytest.approx(trl[name], rel=1e-6)


def test_orpo_equals_trl_s_orpo_trainer():
    from medtune.train.objectives.orpo import ORPO, ORPOSettings

    loss, metrics = _loss(ORPO(), types.SimpleNamespace(orpo=ORPOSettings(beta=0.1)))
    trl = FIXTURE["orpo beta=0.1"]
    assert loss == pytest.approx(trl["loss"], rel=1e-6)
    for name in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[name] == pytest.approx(trl[name], rel=1e-5)


def test_orpo_s_log_odds_stay_finite_for_a_reply_the_model_is_certain_of():
    from medtune.train.objectives.orpo import log1mexp

    x = torch.tensor([-1e-30, -1e-12, -1e-3, -0.5, -20.0, -200.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x[2:]), torch.log(1 - torch.exp(x[2:])), rtol=1e-9)
    assert bool(torch.isinf(log1mexp(torch.tensor([0.0])))) and float(log1mexp(x[1:2])) == pytest.approx(
        math.log(1e-12), rel=1e-6)


def _error(**stage):
    raw = {"model": "m", "output_dir": "o", "stages": [{"name": "p", "data": {"path": "x"}, "lr": {"llm": 1e-5},
                                                         **stage}]}
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    return str(info.value)


def test_a_recipe_checks_simpo_and_orpo_settings_and_their_pairs():
    assert "stages[0].packing: a SimPO stage keeps each pair's two rows together" in _error(method="simpo",
                                                                                            packing=True)
    assert "stages[0].group_by_length: an ORPO stage keeps each pair's two rows together" in _error(
        method="orpo", group_by_length=True)
    assert "stages[0].simpo.gamma: must be a number >= 0, got -1.0" in _error(method="simpo", simpo={"gamma": -1})
    assert "stages[0].orpo.beta: must be a number > 0, got 0.0" in _error(method="orpo", orpo={"beta": 0})
    assert "stages[0].orpo.lambda: unknown key" in _error(method="orpo", orpo={"lambda": 0.1})
    assert "stages[0].simpo: a simpo section belongs to method simpo, not dpo" in _error(method="dpo",
                                                                                         simpo={"beta": 2})


@pytest.mark.slow
@pytest.mark.parametrize("method, settings", [("simpo", {"beta": 2.0, "gamma": 0.5}), ("orpo", {"beta": 1.0})])
def test_a_reference_free_stage_learns_to_prefer_the_chosen_replies(method, settings, tmp_path):
    """16 VQA-RAD yes/no pairs (chosen = the answer, rejected = the other): before training the tiny model prefers
    the chosen reply (by average log-probability) where it says yes, after 80 steps on nearly all; ORPO also
    raises the chosen replies' likelihood (its NLL term)."""
    from test_dpo import _pairs, _write

    from medtune.models.build import build_vlm, load_vlm
    from medtune.models.presets import tiny_spec
    from medtune.paths import bundled_data
    from medtune.models.kinds.base import per_row
    from medtune.train.objectives.dpo import PairCollator
    from medtune.train.run import read_metrics, run_recipe

    pairs = _pairs(16)
    root = bundled_data("vqa_rad", "images")
    recipe = parse_recipe({
        "model": {"preset": "tiny"}, "output_dir": str(tmp_path / "run"), "report_to": ["none"],
        "stages": [{"name": method, "method": method, method: settings,
                    "data": {"path": str(_write(pairs, tmp_path / "pairs.jsonl")), "format": "canonical",
                             "image_root": str(root)},
                    "lr": {"llm": 2e-3, "projector": 2e-3}, "max_steps": 80, "batch_size": 8, "log_steps": 1,
                    "schedule": "constant", "warmup_ratio": 0.0, "max_length": 256}]})
    run_recipe(recipe)
    stage = tmp_path / "run" / f"stage-0-{method}"
    logged = [m for m in read_metrics(stage / "metrics.jsonl") if "loss" in m]
    assert logged[-1]["loss"] < logged[0]["loss"] and "rewards/accuracies" in logged[0]

    def averages(vlm):
        rows = [{"chosen": vlm.encode_sample(p, root, max_length=256),
                 "rejected": vlm.encode_sample(p.with_reply(p.rejected), root, max_length=256)} for p in pairs]
        batch = PairCollator(vlm.collator())(rows)
        with torch.no_grad():
            token_logps, row_of = vlm.labelled_token_logps(vlm.model.eval(), batch)
        mean = per_row(token_logps, row_of, 2 * len(pairs), mean=True)
        return mean[:len(pairs)], mean[len(pairs):]

    before, after = averages(build_vlm(tiny_spec())), averages(load_vlm(stage / "model"))
    assert float((before[0] > before[1]).float().mean()) <= 0.75
    assert float((after[0] > after[1]).float().mean()) >= 0.9
    if method == "orpo":
        assert float(after[0].mean()) > float(before[0].mean())
