"""End to end through the real CLI: stages chain, LoRA merges, what the user sees, skips, refusals, resume."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from medtune.cli import main
from medtune.paths import bundled_data
from train_helpers import part_of


def write_recipe(tmp_path, **changes) -> str:
    data = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 16}
    recipe = {
        "model": {"preset": "tiny"}, "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
        "defaults": {"data": data, "batch_size": 2, "max_length": 256, "log_steps": 1, "save_steps": 2},
        "stages": [
            {"name": "align", "template": "plain", "lr": {"projector": 1e-3}, "max_steps": 2, "eval_steps": 2,
             "eval_data": {"path": "bundled:vqa_rad/testset.json", "format": "vqa-rad", "limit": 4}},
            {"name": "sft", "lr": {"projector": 1e-4, "lora": 1e-3}, "packing": True, "max_steps": 3,
             "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        ],
        **changes,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def weights(directory) -> dict[str, torch.Tensor]:
    from medtune.models.build import load_vlm

    return {n: p.detach().clone() for n, p in load_vlm(directory).model.named_parameters()}


@pytest.mark.slow
def test_two_stages_through_the_cli(tmp_path, capsys):
    from medtune.models.build import load_vlm
    from medtune.models.templates import get_template

    assert main(["train", write_recipe(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stage align: 2 steps" in out and "stage sft: 3 steps" in out and "summary.json" in out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [s["steps"] for s in summary["stages"]] == [2, 3]
    # stage 2 starts from stage 1's model: LoRA merged into the LLM, vision untouched, projector trained
    aligned, tuned = weights(run / "stage-0-align" / "model"), weights(run / "stage-1-sft" / "model")
    changed = {part_of(n) for n in tuned if not torch.equal(tuned[n], aligned[n])}
    assert changed == {"projector", "llm"}
    lora_layers = {n for n in tuned if not torch.equal(tuned[n], aligned[n]) and part_of(n) == "llm"}
    assert lora_layers and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in lora_layers)
    assert (run / "stage-1-sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((run / "stage-1-sft" / "model").glob("*.bin"))
    # the served template is the model's (vicuna), not the alignment stage's plain
    assert load_vlm(run / "stage-1-sft" / "model").tokenizer.chat_template == get_template("vicuna").jinja
    # what the user sees: metrics per step with throughput, TensorBoard events, a stage summary
    metrics = [json.loads(line) for line in (run / "stage-1-sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["tokens_per_second"] > 0 and m["learning_rate"] >= 0 for m in steps)
    # each part follows its own peak rate through the same schedule
    assert [m["lr_lora"] for m in steps] == pytest.approx([m["learning_rate"] for m in steps])
    assert steps[1]["lr_lora"] == pytest.approx(10 * steps[1]["lr_projector"]) and steps[1]["lr_lora"] > 0
    assert list((run / "stage-1-sft").glob("runs/*/events.out.tfevents.*"))
    align_metrics = (run / "stage-0-align" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in align_metrics if "eval_loss" in line] == [2]
    stage = json.loads((run / "stage-1-sft" / "summary.json").read_text())
    assert stage["tokens"] == steps[-1]["tokens_seen"] > 0
    assert stage["last_checkpoint"].endswith("checkpoint-3")

    # `medtune merge` on the last LoRA checkpoint gives the stage's model
    assert main(["merge", str(run / "stage-1-sft" / "checkpoint-3"), str(tmp_path / "merged")]) == 0
    merged = weights(tmp_path / "merged")
    assert all(torch.allclose(merged[n], tuned[n], atol=1e-6) for n in tuned)
    assert main(["merge", str(run / "stage-1-sft" / "checkpoint-3"), str(tmp_path / "merged")]) == 2
    assert "already exists" in capsys.readouterr().err

    # a finished run is never overwritten; --resume skips finished stages
    assert main(["train", write_recipe(tmp_path)]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["train", write_recipe(tmp_path), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_start_stage_needs_the_previous_stage_model(tmp_path, capsys):
    assert main(["train", write_recipe(tmp_path), "--start-stage", "1"]) == 2
    err = capsys.readouterr().err
    assert "starts from stage align's model, which is not at" in err and "--start-stage 0" in err
    assert main(["train", write_recipe(tmp_path), "--start-stage", "5"]) == 2
    assert "the recipe has stages 0..1" in capsys.readouterr().err


def test_unusable_samples_are_counted_with_their_reason(tmp_path):
    from medtune.train.recipe import load_recipe
    from medtune.train.run import run_recipe

    image = next(bundled_data("vqa_rad", "images").glob("*.jpg")).name
    good = {"id": "ok", "messages": [
        {"role": "user", "content": [{"type": "image", "image": {"path": image}}, {"type": "text", "text": "Is it normal?"}]},
        {"role": "assistant", "content": "yes"}]}
    lines = [json.dumps({**good, "id": f"ok{i}"}) for i in range(4)]
    lines.append("{not json")
    lines.append(json.dumps({"id": "no-reply", "messages": [{"role": "user", "content": "hello"}]}))
    lines.append(json.dumps({**good, "id": "long", "messages": [good["messages"][0], {
        "role": "assistant", "content": "word " * 400}]}))
    lines.append(json.dumps({**good, "id": "broken-image", "messages": [
        {"role": "user", "content": [{"type": "image", "image": {"path": "missing.jpg"}}, {"type": "text", "text": "?"}]},
        good["messages"][1]]}))
    data = tmp_path / "samples.jsonl"
    data.write_text("\n".join(lines) + "\n")
    stage = {"name": "align", "lr": {"projector": 1e-3}, "max_steps": 1, "max_length": 200,
             "data": {"path": str(data), "format": "canonical", "limit": None, "truncation": "drop",
                      "image_root": str(bundled_data("vqa_rad", "images"))}}
    recipe = load_recipe(write_recipe(tmp_path, stages=[stage]))
    [result] = run_recipe(recipe)
    assert result.samples == 4
    assert result.skipped == {"not valid JSON": 1, "no assistant reply": 1, "too long": 1, "bad image": 1}


def test_resume_reads_training_state_without_pickles(tmp_path, monkeypatch):
    from medtune.train import checkpoints
    from medtune.train.recipe import load_recipe
    from medtune.train.run import run_recipe, stage_dir

    recipe = load_recipe(write_recipe(tmp_path), ["stages=[{name: align, lr: {projector: 0.001}, max_steps: 4}]",
                                                  "report_to=[none]"])
    run_recipe(recipe)
    directory = stage_dir(recipe.output_dir, 0, recipe.stages[0])
    import shutil

    shutil.rmtree(directory / "model")            # as if killed between checkpoint-2 and the end
    shutil.rmtree(directory / "checkpoint-4")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    [result] = run_recipe(recipe, resume=True)
    assert result.resumed_from == str(directory / "checkpoint-2") and result.steps == 4
    assert calls and all(flag is True for flag in calls)   # optimizer, scheduler, RNG: weights_only
    assert checkpoints.is_complete(directory / "checkpoint-4")


def test_the_exact_speed_ups_train_exactly_as_the_full_forward(tmp_path, monkeypatch):
    """Two stages (one packed, with grad accumulation) trained with the exact speed-ups (the LM head only at
    labelled positions; the frozen tower's features reused) and without them give the same per-step losses and
    the same final weights."""
    from medtune.models.kinds.base import Speedups
    from medtune.models.kinds.composed import ComposedVLM

    used = []

    def train(name, speedups):
        with monkeypatch.context() as patch:
            if speedups is not None:
                patch.setattr(ComposedVLM, "exact_speedups", lambda self, **engine: speedups)
            else:
                original = ComposedVLM.exact_speedups
                patch.setattr(ComposedVLM, "exact_speedups",
                              lambda self, **engine: used.append(original(self, **engine)) or used[-1])
            (tmp_path / name).mkdir()
            recipe = write_recipe(tmp_path / name, stages=[
                {"name": "sft", "lr": {"projector": 1e-3, "llm": 1e-3}, "max_steps": 3, "grad_accum": 2},
                {"name": "packed", "lr": {"llm": 1e-3}, "packing": True, "max_steps": 2}])
            assert main(["train", recipe]) == 0
        run = tmp_path / name / "run"
        losses = [[m["loss"] for m in map(json.loads, (run / stage / "metrics.jsonl").read_text().splitlines())
                   if "loss" in m] for stage in ("stage-0-sft", "stage-1-packed")]
        return losses, weights(run / "stage-1-packed" / "model")

    fast_losses, fast = train("fast", None)
    assert used and all(s.labelled_positions_head and s.frozen_vision_features for s in used)
    full_losses, full = train("full", Speedups(labelled_positions_head=False, frozen_vision_features=False))
    assert [len(stage) for stage in fast_losses] == [3, 2]
    assert sum(fast_losses, []) == pytest.approx(sum(full_losses, []), rel=1e-5)
    assert all(torch.allclose(fast[n], full[n], atol=1e-6) for n in full)
