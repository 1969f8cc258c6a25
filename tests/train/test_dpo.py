"""DPO: preference pairs in the canonical schema, the loss against its formula (and log 2 while the policy is the
reference), a stage that learns to prefer the chosen replies, and what a recipe refuses."""
from __future__ import annotations

import json
import math
import types

import pytest

from medtune.data.schema import Message, Part, Sample, SchemaError
from medtune.paths import bundled_data
from medtune.train.recipe import RecipeError, parse_recipe

torch = pytest.importorskip("torch")

torch.set_num_threads(1)


def _reply(text: str) -> Message:
    return Message("assistant", (Part.of_text(text),))


def _pairs(n: int):
    """VQA-RAD's first ``n`` yes/no training questions: chosen = the answer, rejected = the other one."""
    from medtune.data.formats import read_records, resolve_format
    from medtune.data.jsonl import Tally
    from medtune.paths import resolve_data_path

    path = resolve_data_path("bundled:vqa_rad/trainset.json")
    pairs = []
    for sample in read_records(resolve_format("vqa-rad", path), path, tally=Tally()):
        answer = sample.messages[-1].text.strip().lower()
        if answer in ("yes", "no"):
            pairs.append(Sample(id=sample.id, messages=[*sample.messages[:-1], _reply(answer)], meta=sample.meta,
                                rejected=_reply("no" if answer == "yes" else "yes")))
        if len(pairs) == n:
            return pairs
    raise AssertionError("not enough yes/no questions")


def _write(pairs, path):
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pairs), encoding="utf-8")
    return path


def test_a_preference_pair_round_trips_and_a_pair_that_prefers_nothing_is_refused():
    pair = _pairs(1)[0]
    assert Sample.from_dict(json.loads(json.dumps(pair.to_dict()))) == pair
    assert pair.with_reply(pair.rejected).messages[-1] == pair.rejected and pair.with_reply(pair.rejected).rejected is None
    with pytest.raises(SchemaError, match="the rejected reply equals the chosen one"):
        Sample(id="x", messages=pair.messages, rejected=pair.messages[-1])
    with pytest.raises(SchemaError, match="needs an assistant reply last"):
        Sample(id="x", messages=pair.messages[:-1], rejected=pair.rejected)


def test_the_loss_is_dpo_s_formula_and_log_2_while_the_policy_is_the_reference():
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec
    from medtune.train.objectives.dpo import DPO, DPOSettings, PairCollator

    vlm = build_vlm(tiny_spec())
    root = bundled_data("vqa_rad", "images")
    rows = [{"chosen": vlm.encode_sample(p, root, max_length=256),
             "rejected": vlm.encode_sample(p.with_reply(p.rejected), root, max_length=256)} for p in _pairs(3)]
    batch = PairCollator(vlm.collator())(rows)
    objective = DPO()
    objective.prepare(vlm, vlm.model, types.SimpleNamespace(dpo=DPOSettings(beta=0.5), precision="fp32"))
    with torch.no_grad():
        assert float(objective.loss(vlm, vlm.model, batch)[0]) == pytest.approx(math.log(2), abs=1e-6)
        for parameter in vlm.model.model.language_model.parameters():   # the policy moves away from the reference
            parameter.add_(torch.randn_like(parameter) * 0.05)
        loss = float(objective.loss(vlm, vlm.model, batch)[0])

        def logps(model):   # a full forward pass per row, every position's logits: the formula's log p
            out = []
            for row in range(batch["input_ids"].shape[0]):
                inputs = {k: v[row:row + 1] for k, v in batch.items() if k not in ("labels", "pixel_values")}
                logits = model(**inputs, pixel_values=batch["pixel_values"][row:row + 1]).logits[0, :-1]
                targets = batch["labels"][row, 1:]
                kept = targets != -100
                out.append(logits[kept].log_softmax(-1).gather(-1, targets[kept][:, None]).sum())
            return torch.stack(out)

        policy, reference = logps(vlm.model), logps(objective.reference.frozen)
    margins = 0.5 * ((policy[:3] - reference[:3]) - (policy[3:] - reference[3:]))
    assert loss == pytest.approx(float(-torch.nn.functional.logsigmoid(margins).mean()), abs=1e-5)
    assert loss != pytest.approx(math.log(2), abs=1e-3)


def test_a_recipe_refuses_what_would_split_a_pair():
    def error(**stage):
        raw = {"model": "m", "output_dir": "o", "stages": [{"name": "p", "method": "dpo", "data": {"path": "x"},
                                                             "lr": {"llm": 1e-5}, **stage}]}
        with pytest.raises(RecipeError) as info:
            parse_recipe(raw)
        return str(info.value)

    assert "stages[0].packing: a DPO stage keeps each pair's two rows together" in error(packing=True)
    assert "stages[0].dpo.beta: must be a number > 0, got 0" in error(dpo={"beta": 0})
    assert "stages[0].dpo: a dpo section belongs to method dpo, not sft" in error(method="sft", dpo={"beta": 0.1})


@pytest.mark.slow
def test_a_dpo_stage_learns_to_prefer_the_chosen_replies(tmp_path):
    """A short DPO stage on 16 pairs, from the tiny model: the first logged loss is log 2, and after training the
    policy prefers the chosen reply of most pairs over the reference (the implicit reward's accuracy)."""
    from medtune.models.build import build_vlm, load_vlm
    from medtune.models.presets import tiny_spec
    from medtune.train.objectives.dpo import PairCollator
    from medtune.train.run import read_metrics, run_recipe

    pairs = _pairs(16)
    data = _write(pairs, tmp_path / "pairs.jsonl")
    recipe = parse_recipe({
        "model": {"preset": "tiny"}, "output_dir": str(tmp_path / "run"), "report_to": ["none"],
        "cache_dir": str(tmp_path / "cache"),
        "stages": [{"name": "dpo", "method": "dpo", "dpo": {"beta": 0.5},
                    "data": {"path": str(data), "format": "canonical", "image_root": str(bundled_data("vqa_rad", "images"))},
                    "lr": {"llm": 2e-3, "projector": 2e-3}, "max_steps": 40, "batch_size": 8, "log_steps": 1,
                    "schedule": "constant", "warmup_ratio": 0.0, "max_length": 256}]})
    run_recipe(recipe)
    stage = tmp_path / "run" / "stage-0-dpo"
    logged = [m for m in read_metrics(stage / "metrics.jsonl") if "loss" in m]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and "rewards/accuracies" in logged[0]
    trained = load_vlm(stage / "model")
    start = build_vlm(tiny_spec())   # the recipe's starting weights: the reference
    root = bundled_data("vqa_rad", "images")
    rows = [{"chosen": trained.encode_sample(p, root, max_length=256),
             "rejected": trained.encode_sample(p.with_reply(p.rejected), root, max_length=256)} for p in pairs]
    batch = PairCollator(trained.collator())(rows)
    with torch.no_grad():
        policy = trained.labelled_logps(trained.model.eval(), batch)
        reference = start.labelled_logps(start.model.eval(), batch)
    n = len(pairs)
    margins = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])   # the implicit reward's, over beta
    assert float((margins > 0).float().mean()) >= 0.9


@pytest.mark.slow
def test_a_dpo_stage_resumed_from_a_checkpoint_ends_as_an_uninterrupted_run(tmp_path):
    """The reference is the stage's starting model, taken before a resumed run loads its checkpoint."""
    import shutil

    from medtune.models.build import load_vlm
    from medtune.train.run import run_recipe

    data = _write(_pairs(12), tmp_path / "pairs.jsonl")

    def run(folder, max_steps, resume=False):
        recipe = parse_recipe({
            "model": {"preset": "tiny"}, "output_dir": str(folder), "report_to": ["none"],
            "cache_dir": str(tmp_path / "cache"),
            "stages": [{"name": "dpo", "method": "dpo",
                        "data": {"path": str(data), "format": "canonical",
                                 "image_root": str(bundled_data("vqa_rad", "images"))},
                        "lr": {"llm": 1e-3}, "max_steps": max_steps, "batch_size": 4, "save_steps": 2,
                        "schedule": "constant", "warmup_ratio": 0.0, "max_length": 256}]})
        run_recipe(recipe, resume=resume)
        return folder / "stage-0-dpo"

    whole = run(tmp_path / "whole", 4)
    resumed = run(tmp_path / "resumed", 2)
    shutil.rmtree(resumed / "model")   # as if the run had stopped after checkpoint-2
    (resumed / "summary.json").unlink()
    run(tmp_path / "resumed", 4, resume=True)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
    a = dict(load_vlm(whole / "model").model.named_parameters())
    b = dict(load_vlm(resumed / "model").model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("model, moe", [({"preset": "tiny"}, None), ({"preset": "tiny"}, {"layers": [0],
                                                                                           "num_experts": 2,
                                                                                           "aux_loss_coef": 0.1}),
                                        ({"preset": "tiny-qwen2-vl"}, None), ({"preset": "tiny-chameleon"}, None)],
                         ids=["composed", "moe", "native", "discrete"])
def test_every_kind_trains_a_dpo_stage_from_its_reference(model, moe, tmp_path):
    """At the first step the policy is the reference, so DPO's loss is log 2 for every kind; an MoE model adds its
    router losses to it."""
    from medtune.train.run import read_metrics, run_recipe

    stage = {"name": "dpo", "method": "dpo", "max_steps": 2, "batch_size": 4, "log_steps": 1, "max_length": 512,
             "data": {"path": "bundled:vqa_rad/tiny-preferences.jsonl", "format": "canonical", "limit": 8,
                      "image_root": str(bundled_data("vqa_rad", "images"))},
             "lr": {"llm": 1e-3, **({"experts": 1e-3} if moe else {})}, **({"moe": moe} if moe else {})}
    recipe = parse_recipe({"model": model, "output_dir": str(tmp_path / "run"), "report_to": ["none"],
                           "cache_dir": str(tmp_path / "cache"), "stages": [stage]})
    run_recipe(recipe)
    directory = tmp_path / "run" / "stage-0-dpo"
    first = next(m for m in read_metrics(directory / "metrics.jsonl") if "loss" in m)
    if moe is None:
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    else:
        assert first["loss"] > math.log(2) + 1e-3   # log 2 plus the weighted load-balancing loss
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["samples"] == 8 and summary["skipped"] == {}


def test_a_dpo_stage_checks_its_label_rule_as_any_stage(tmp_path):
    from medtune.train.run import run_recipe

    recipe = parse_recipe({"model": {"preset": "tiny"}, "output_dir": str(tmp_path / "run"), "report_to": ["none"],
                           "stages": [{"name": "dpo", "method": "dpo", "lr": {"llm": 1e-3}, "max_steps": 1,
                                       "data": {"path": "bundled:vqa_rad/tiny-preferences.jsonl",
                                                "format": "canonical", "labels": "first_separator"}}]})
    with pytest.raises(RecipeError, match="data.labels: 'first_separator' applies to discrete-token models only"):
        run_recipe(recipe)


@pytest.mark.slow
def test_accumulated_micro_batches_train_as_one_batch_of_their_pairs(tmp_path):
    """Batch 4 against batch 2 with two accumulation steps: the same pairs per update, so the same loss at the
    first step (each micro-batch's mean divided by the steps; without that the accumulated loss doubles)."""
    from medtune.train.run import read_metrics, run_recipe

    def first_loss(name, batch_size, grad_accum):
        recipe = parse_recipe({
            "model": {"preset": "tiny"}, "output_dir": str(tmp_path / name), "report_to": ["none"],
            "cache_dir": str(tmp_path / "cache"),
            "stages": [{"name": "dpo", "method": "dpo", "dpo": {"beta": 0.5}, "log_steps": 1,
                        "data": {"path": "bundled:vqa_rad/tiny-preferences.jsonl", "format": "canonical",
                                 "limit": 8, "image_root": str(bundled_data("vqa_rad", "images"))},
                        "lr": {"llm": 1e-3}, "max_steps": 2, "batch_size": batch_size, "grad_accum": grad_accum,
                        "schedule": "constant", "warmup_ratio": 0.0, "max_length": 256}]})
        run_recipe(recipe)
        return [m["loss"] for m in read_metrics(tmp_path / name / "stage-0-dpo" / "metrics.jsonl") if "loss" in m]

    whole, accumulated = first_loss("whole", 4, 1), first_loss("accumulated", 2, 2)
    assert whole[0] == pytest.approx(math.log(2), abs=1e-4) and accumulated[0] == pytest.approx(whole[0], rel=1e-5)
    assert accumulated[1] == pytest.approx(whole[1], rel=1e-3)


@pytest.mark.slow
def test_precomputed_reference_log_probs_train_as_the_reference_model_does(tmp_path):
    """precompute_reference: one pass of the starting model over the pairs before the first step, then no reference
    forward and no frozen copy; the losses and the trained weights are those of the stage that runs the reference
    every step (to float rounding: the pass batches the pairs in order, training shuffles them)."""
    from medtune.models.build import load_vlm
    from medtune.train.objectives.dpo import DPO
    from medtune.train.run import read_metrics, run_recipe

    data = _write(_pairs(12), tmp_path / "pairs.jsonl")
    released = []
    original = DPO.rows

    def rows(self, dataset, stage):
        out = original(self, dataset, stage)
        released.append((self.reference.frozen is None, dataset.reference_logps is not None))
        return out

    def run(name, precompute):
        recipe = parse_recipe({
            "model": {"preset": "tiny"}, "output_dir": str(tmp_path / name), "report_to": ["none"],
            "cache_dir": str(tmp_path / "cache"),
            "stages": [{"name": "dpo", "method": "dpo", "dpo": {"beta": 0.5, "precompute_reference": precompute},
                        "data": {"path": str(data), "format": "canonical",
                                 "image_root": str(bundled_data("vqa_rad", "images"))},
                        "lr": {"llm": 1e-3, "projector": 1e-3}, "max_steps": 6, "batch_size": 4, "log_steps": 1,
                        "schedule": "constant", "warmup_ratio": 0.0, "max_length": 256}]})
        run_recipe(recipe)
        stage = tmp_path / name / "stage-0-dpo"
        losses = [m["loss"] for m in read_metrics(stage / "metrics.jsonl") if "loss" in m]
        return losses, dict(load_vlm(stage / "model").model.named_parameters())

    import unittest.mock

    with unittest.mock.patch.object(DPO, "rows", rows):
        every_step, every_step_weights = run("every-step", False)
        precomputed, precomputed_weights = run("precomputed", True)
    assert released == [(False, False), (True, True)]   # the frozen copy is gone once its numbers are
    assert len(every_step) == 6 and precomputed == pytest.approx(every_step, abs=1e-5)
    assert precomputed[0] == pytest.approx(math.log(2), abs=1e-5)
    assert all(torch.allclose(precomputed_weights[n], every_step_weights[n], atol=1e-5) for n in every_step_weights)


def test_the_frozen_reference_follows_the_policy_to_its_device():
    """Trainer places the policy (on a GPU, say); the frozen copy is moved to it before it runs, not left behind."""
    from medtune.train.objectives.reference import Reference

    reference = Reference()
    reference.frozen = torch.nn.Linear(2, 2)
    policy = torch.nn.Linear(2, 2).to("meta")
    assert reference._run(policy, lambda model: next(model.parameters()).device) == torch.device("meta")
    assert next(reference.frozen.parameters()).device == torch.device("meta")
    reference.release()
    with pytest.raises(RuntimeError, match="released after its log-probabilities were precomputed"):
        reference._run(policy, lambda model: None)


@pytest.mark.slow
@pytest.mark.parametrize("lora, precompute", [(False, False), (True, True), (False, True)],
                         ids=["frozen copy", "lora, precomputed", "frozen copy, precomputed"])
def test_in_bf16_the_reference_runs_in_the_policy_s_autocast(lora, precompute, tmp_path):
    """The policy starts as the reference: in bf16 the first loss is log 2 only if the reference's forward (the
    frozen copy, the adapters-off model, or the pass that precomputes it) runs in the bf16 autocast that
    Accelerate wraps the policy's forward in."""
    from medtune.train.recipe import bf16_supported
    from medtune.train.run import read_metrics, run_recipe

    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no bf16 autocast (no avx512_bf16 / AMX)")
    data = _write(_pairs(4), tmp_path / "pairs.jsonl")   # one batch: a precomputing pass pads as the step does
    trained = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "lr": {"lora": 1e-3}} if lora else {"lr": {"llm": 1e-3}}
    recipe = parse_recipe({
        "model": {"preset": "tiny"}, "output_dir": str(tmp_path / "run"), "report_to": ["none"],
        "stages": [{"name": "dpo", "method": "dpo", "dpo": {"beta": 0.5, "precompute_reference": precompute},
                    "data": {"path": str(data), "format": "canonical",
                             "image_root": str(bundled_data("vqa_rad", "images"))},
                    "precision": "bf16", "max_steps": 1, "batch_size": 4, "log_steps": 1, "max_length": 256,
                    **trained}]})
    run_recipe(recipe)
    logged = [m for m in read_metrics(tmp_path / "run" / "stage-0-dpo" / "metrics.jsonl") if "loss" in m]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_frozen_tower_encodes_each_pair_s_image_once():
    """The chosen and the rejected row of a pair hold the same image: with the tower frozen the composed kind's
    feature cache runs the tower once per distinct image of the batch (once per pair at most, for the policy and
    the reference together), and the loss is the one full forward passes give."""
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec
    from medtune.train.objectives.dpo import DPO, DPOSettings, PairCollator

    vlm = build_vlm(tiny_spec())
    vlm.model.model.vision_tower.requires_grad_(False)
    root = bundled_data("vqa_rad", "images")
    pairs = _pairs(3)
    batch = PairCollator(vlm.collator())([{"chosen": vlm.encode_sample(p, root, max_length=256),
                                           "rejected": vlm.encode_sample(p.with_reply(p.rejected), root, max_length=256)}
                                          for p in pairs])
    speedups = vlm.exact_speedups()
    assert speedups.frozen_vision_features
    distinct = len({p.images[0].path for p in pairs})
    objective = DPO()
    objective.prepare(vlm, vlm.model, types.SimpleNamespace(dpo=DPOSettings(beta=0.5), precision="fp32"))
    with torch.no_grad():
        for parameter in vlm.model.model.language_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        fast = float(objective.loss(vlm, vlm.model, dict(batch), speedups=speedups)[0])
        plain = float(objective.loss(vlm, vlm.model, dict(batch), speedups=type(speedups)())[0])
    # the policy's 2B rows and the reference's 2B rows: the tower ran once per distinct image for all of them
    assert (vlm._features.misses, vlm._features.hits) == (distinct, 4 * len(pairs) - distinct)
    assert fast == pytest.approx(plain, abs=1e-6)
