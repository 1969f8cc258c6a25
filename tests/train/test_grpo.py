"""GRPO: rewards that are the evaluation's metrics, the loss against its formula on fixed rollouts (both
normalisations, with the KL to the reference), and a stage that samples, learns and resumes exactly."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import types

import pytest

from medtune.train.recipe import RecipeError, parse_recipe

torch = pytest.importorskip("torch")

torch.set_num_threads(1)

DATA = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 8}


ANSWERS = [   # (completion, truth, answer type, choices, label)
    ("Yes, there is.", "yes", "closed", None, None), ("no", "Yes", "closed", None, None),
    ("maybe", "yes", "closed", None, None), ("<think>apex clear</think><answer>no</answer>", "no", "closed", None, None),
    ("B", "Lung", "mcq", ["Heart", "Lung"], "B"), ("(A) Heart", "Lung", "mcq", ["Heart", "Lung"], "B"),
    ("Lung", "Lung", "mcq", ["Heart", "Lung"], "B"), ("the left lung", "Left lung", "open", None, None),
    ("lung", "left lung", "open", None, None), ("<answer>liver</answer>", "liver", "open", None, None)]


def _items():
    from medtune.eval.metrics import Item

    return [Item(str(i), f"question {i}?", truth, kind, answer, choices, answer_label=label)
            for i, (answer, truth, kind, choices, label) in enumerate(ANSWERS)]


@pytest.mark.parametrize("name, family", [("strict", "strict"), ("strict-closed", "strict"),
                                          ("mcq-letter", "letter"), ("vlmevalkit", "vlmevalkit"),
                                          ("medmax", "medmax"), ("judge", "judge")])
def test_each_reward_averages_to_its_metric_family_s_reported_accuracy(name, family):
    """The mean reward over a set of answers, per answer type, is what medtune eval reports for them (the
    family's headline row, in %); the <answer> block is what is scored."""
    from judge_helpers import fake_endpoint

    from medtune.eval.judge import Judge
    from medtune.eval.metrics import aggregate, score_items
    from medtune.eval.rewards import answer_text, rewards

    def judge():   # a judge that says CORRECT exactly when the reference is in the answer
        replies = ["CORRECT" if truth.lower() in answer_text(answer).lower() else "INCORRECT"
                   for answer, truth, kind, _, _ in ANSWERS if kind == "open"]
        return Judge("http://judge.test/v1", "grader", transport=fake_endpoint(replies, []))

    items = _items()
    got = rewards(name, items, judge=judge() if family in ("judge", "medmax") else None)
    scored = [dataclasses.replace(item, prediction=answer_text(item.prediction)) for item in items]
    reported = {(row.answer_type, row.metric): row.estimate.value
                for row in aggregate("t", scored, score_items(scored, [family],
                                                              judge=judge() if family in ("judge", "medmax") else None))
                if row.group_by == "all"}
    from medtune.eval.metrics import HEADLINE

    checked = 0
    for answer_type, metric in HEADLINE[family].items():
        if (answer_type, metric) not in reported or (name == "strict-closed" and answer_type != "closed"):
            continue
        mine = [r for r, item in zip(got, items) if item.answer_type == answer_type]
        assert 100 * sum(mine) / len(mine) == pytest.approx(reported[answer_type, metric])
        checked += 1
    assert checked >= 1
    if name == "strict-closed":
        assert [r for r, item in zip(got, items) if item.answer_type != "closed"] == [0.0] * 6
    assert got != [got[0]] * len(got)   # the answers are told apart


def test_the_format_reward_wants_think_then_answer():
    from medtune.eval.metrics import Item
    from medtune.eval.rewards import rewards

    texts = ["<think>the apex is clear</think> <answer>no</answer>", "<answer>no</answer>", "no"]
    assert rewards("format", [Item(str(i), "q?", "no", "closed", t) for i, t in enumerate(texts)]) == [1.0, 0.0, 0.0]


def test_the_judge_reward_needs_an_endpoint():
    from medtune.eval.rewards import rewards

    with pytest.raises(ValueError, match="the judge reward needs a judge endpoint"):
        rewards("judge", _items())


def test_settings_are_checked_by_name():
    def error(grpo):
        with pytest.raises(RecipeError) as info:
            parse_recipe({"model": "m", "output_dir": "o", "stages": [
                {"name": "g", "method": "grpo", "data": {"path": "x"}, "lr": {"llm": 1e-5}, "grpo": grpo}]})
        return str(info.value)

    assert ("grpo.rewards: unknown reward 'exact' (known: strict, strict-closed, mcq-letter, vlmevalkit, medmax, "
            "judge, format)") in error({"rewards": {"exact": 1.0}})
    assert "grpo.judge: the judge reward needs a judge endpoint" in error({"rewards": {"judge": 1.0}})
    assert "grpo.judge: give base_url and model (strings) only, got ['model', 'url']" in error(
        {"rewards": {"judge": 1.0}, "judge": {"url": "http://x/v1", "model": "m"}})
    assert "grpo.group_size: must be an integer of at least 2, got 1" in error({"group_size": 1})
    assert "grpo.normalise: 'mean' is not one of token, sequence" in error({"normalise": "mean"})


@pytest.mark.parametrize("normalise", ["token", "sequence"])
def test_the_loss_is_grpo_s_formula_on_fixed_rollouts(normalise):
    """Two prompts, two completions each, rewards 1, 0 | 0, 0: the advantages, the KL estimator and the average
    as the formula gives them, from the policy's and the reference's per-token log-probs."""
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec
    from medtune.train.objectives.grpo import GRPO, GRPOSettings

    vlm = build_vlm(tiny_spec())
    objective = GRPO()
    objective.prepare(vlm, vlm.model, types.SimpleNamespace(grpo=GRPOSettings(group_size=2, beta=0.5,
                                                                              normalise=normalise), precision="fp32"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (4, 12), generator=generator)
    labels = torch.full_like(ids, -100)
    lengths = [3, 5, 2, 4]
    for row, n in enumerate(lengths):
        labels[row, 12 - n:] = ids[row, 12 - n:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    objective._rollouts = lambda vlm, prompts: (batch, rewards, {"strict": rewards})
    with torch.no_grad():
        for parameter in vlm.model.model.language_model.parameters():   # the policy leaves the reference
            parameter.add_(torch.randn_like(parameter) * 0.05)
        loss = float(objective.loss(vlm, vlm.model, {"prompts": [{}, {}]})[0])

        def token_logps(model):
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = labels[:, 1:]
            kept = targets != -100
            return [logits[r][kept[r]].log_softmax(-1).gather(-1, targets[r][kept[r]][:, None])[:, 0]
                    for r in range(4)]

        policy, reference = token_logps(vlm.model), token_logps(objective.reference.frozen)
    advantages = [(1 - 0.5) / (math.sqrt(0.5) + 1e-4), (0 - 0.5) / (math.sqrt(0.5) + 1e-4), 0.0, 0.0]
    per_row = [-advantages[r] + 0.5 * (torch.exp(reference[r] - policy[r]) - (reference[r] - policy[r]) - 1)
               for r in range(4)]
    if normalise == "token":
        expected = float(torch.cat(per_row).sum() / sum(lengths))
    else:
        expected = float(torch.stack([p.mean() for p in per_row]).mean())
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _length_reward(items, *, judge=None) -> list[float]:
    return [len(item.prediction) / 10 for item in items]   # varies between a random model's samples: advantages


def _run(folder, max_steps, resume=False):
    from medtune.train.run import run_recipe

    recipe = parse_recipe({
        "model": {"preset": "tiny"}, "output_dir": str(folder), "report_to": ["none"],
        "cache_dir": str(folder.parent / "cache"),
        "stages": [{"name": "grpo", "method": "grpo", "data": DATA, "lr": {"llm": 1e-3}, "max_steps": max_steps,
                    "batch_size": 2, "save_steps": 2, "log_steps": 1, "schedule": "constant", "warmup_ratio": 0.0,
                    "max_length": 256, "grpo": {"group_size": 3, "max_new_tokens": 6, "beta": 0.1,
                                                "rewards": {"length": 1.0, "strict": 1.0}}}]})
    run_recipe(recipe, resume=resume)
    return folder / "stage-0-grpo"


@pytest.mark.slow
def test_a_grpo_stage_samples_learns_and_resumes_exactly(tmp_path, monkeypatch):
    from medtune.eval import rewards
    from medtune.models.build import load_vlm
    from medtune.train.run import read_metrics

    monkeypatch.setitem(rewards.REWARDS, "length", _length_reward)
    whole = _run(tmp_path / "whole", 4)
    logged = [m for m in read_metrics(whole / "metrics.jsonl") if "loss" in m]
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-7)   # the first step's policy is the reference
    assert all(0 < m["completion_length"] <= 6 and m["reward_std"] > 0 for m in logged)
    assert {"reward", "reward/length", "reward/strict"} <= set(logged[0])
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["samples"] == 8

    resumed = _run(tmp_path / "resumed", 2)
    shutil.rmtree(resumed / "model")   # as if the run had stopped after checkpoint-2
    (resumed / "summary.json").unlink()
    _run(tmp_path / "resumed", 4, resume=True)
    a = dict(load_vlm(whole / "model").model.named_parameters())
    b = dict(load_vlm(resumed / "model").model.named_parameters())
    start = dict(load_vlm(resumed / "checkpoint-2").model.named_parameters())
    assert any(not torch.equal(a[n], start[n]) for n in a)   # steps 3 and 4 trained
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("model, moe", [({"preset": "tiny"}, {"layers": [0], "num_experts": 2}),
                                        ({"preset": "tiny-qwen2-vl"}, None), ({"preset": "tiny-chameleon"}, None)],
                         ids=["moe", "native", "discrete"])
def test_every_kind_samples_and_trains_a_grpo_stage(model, moe, tmp_path, monkeypatch):
    """The rollouts are the kind's own generation and prompts (a native family's token types and image grids,
    the discrete kind's text-only answers): every kind samples answers, trains on them and saves its model."""
    from medtune.eval import rewards
    from medtune.models.build import load_vlm
    from medtune.train.run import read_metrics, run_recipe

    monkeypatch.setitem(rewards.REWARDS, "length", _length_reward)
    stage = {"name": "grpo", "method": "grpo", "data": {**DATA, "limit": 4}, "max_steps": 2, "batch_size": 2,
             "log_steps": 1, "max_length": 512, "lr": {"llm": 1e-2, **({"experts": 1e-2} if moe else {})},
             "grpo": {"group_size": 2, "max_new_tokens": 4, "beta": 0.0, "rewards": {"length": 1.0}},
             **({"moe": moe} if moe else {})}
    run_recipe(parse_recipe({"model": model, "output_dir": str(tmp_path / "run"), "report_to": ["none"],
                             "cache_dir": str(tmp_path / "cache"), "stages": [stage]}))
    directory = tmp_path / "run" / "stage-0-grpo"
    logged = [m for m in read_metrics(directory / "metrics.jsonl") if "loss" in m]
    assert all(0 < m["completion_length"] <= 4 for m in logged)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["tokens"] > 0 and summary["method"] == "grpo"
    trained = load_vlm(directory / "model")
    assert (trained.experts is not None) == (moe is not None)


def test_each_sampled_answer_trains_up_to_its_end_of_turn():
    """The rollout batch: left-padded prompts, then each answer's tokens labelled and attended up to and with
    its first end of turn (an answer that never ends keeps them all); token-type columns extended as text; the
    rewards in prompt-major order, each prompt's answers scored against its own reference."""
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec
    from medtune.train.objectives.grpo import GRPO, GRPOSettings

    vlm = build_vlm(tiny_spec())
    objective = GRPO()
    objective.prepare(vlm, vlm.model, types.SimpleNamespace(grpo=GRPOSettings(group_size=2, beta=0.0)))
    end = objective.generator.eos_token_ids[0]
    yes, no = (vlm.tokenizer.convert_tokens_to_ids(vlm.tokenizer.tokenize(word))[0] for word in ("yes", "no"))
    prompts = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9]])
    batch = {"input_ids": prompts, "attention_mask": (prompts != 0).long(), "token_type_ids": torch.zeros_like(prompts)}
    new = torch.tensor([[yes, end, 12, 13], [14, 15, 16, 17], [end, 0, 0, 0], [no, 19, end, 0]])
    objective.generator.sample = lambda encodings, settings: (batch, torch.cat([prompts, new], dim=1))
    from medtune.eval.metrics import Item

    rows = [{"prompt": None, "item": Item("a", "Is it?", "yes", "closed", "")},
            {"prompt": None, "item": Item("b", "Is it?", "no", "closed", "")}]
    training, rewards, _ = objective._rollouts(vlm, rows)
    assert training["labels"][:, :3].eq(-100).all()
    assert training["labels"][:, 3:].tolist() == [[yes, end, -100, -100], [14, 15, 16, 17], [end, -100, -100, -100],
                                                  [no, 19, end, -100]]
    assert training["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1],
                                                   [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
    assert training["token_type_ids"].shape == (4, 7) and not training["token_type_ids"].any()
    answers = [vlm.decode_output(row)[0] for row in ([yes], [14, 15, 16, 17], [], [no, 19])]
    expected = [strict(answers[i], ["yes", "yes", "no", "no"][i]) for i in range(4)]
    assert rewards.tolist() == expected and expected[0] == 1.0


def strict(answer, truth):
    """The strict metric's closed accuracy of one answer, as medtune eval scores it."""
    from medtune.eval.strict import score_item

    return score_item(answer, truth, "closed")["accuracy"]


def test_sampling_for_training_never_writes_an_image_placeholder():
    """A model that most wants to write <image> (+100 on its logit): generate would, Generator.sample does not,
    since an answer holding a placeholder cannot be fed back with the prompt's images (a GRPO step crashed on it)."""
    from medtune.models.build import build_vlm
    from medtune.models.generation import GenerationSettings, Generator
    from medtune.models.presets import tiny_spec
    from medtune.models.processing import load_images
    from medtune.paths import bundled_data

    vlm = build_vlm(tiny_spec())

    def prefer_the_placeholder(module, inputs, logits):
        logits[..., vlm.image_token_id] += 100.0
        return logits

    vlm.model.lm_head.register_forward_hook(prefer_the_placeholder)
    sample = next(iter(_questions(1)))
    prompt = vlm.encode_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}],
                               load_images(sample.images, bundled_data("vqa_rad", "images")))
    generator = Generator(vlm)
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0)
    batch, output = generator.sample([prompt, prompt], settings)
    new = output[:, batch["input_ids"].shape[1]:]
    assert vlm.image_token_id in generator._run_generate(batch, settings)[:, batch["input_ids"].shape[1]:]
    assert vlm.image_token_id not in new and vlm.placeholder_token_ids() == [vlm.image_token_id]


def _questions(n: int):
    from medtune.data.formats import read_records
    from medtune.data.jsonl import Tally
    from medtune.paths import resolve_data_path

    path = resolve_data_path("bundled:vqa_rad/trainset.json")
    samples = read_records("vqa-rad", path, tally=Tally())
    return [next(samples) for _ in range(n)]
