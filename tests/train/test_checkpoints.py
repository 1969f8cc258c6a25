"""Checkpoints: a half-written one is never taken as the latest; kill -9 + --resume == uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medtune.train import checkpoints


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 64)
    (folder / "optimizer.pt").write_bytes(b"o" * 32)
    if complete:
        checkpoints.mark_complete(folder)
    return folder


def test_partial_checkpoints_are_never_the_latest(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)        # killed before the marker
    truncated = fake_checkpoint(tmp_path, 8)           # marker written, then a file lost bytes
    (truncated / "optimizer.pt").write_bytes(b"o" * 5)
    assert checkpoints.latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    removed = checkpoints.discard_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint-6", "checkpoint-8"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


def test_rotation_keeps_the_last_k_complete(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 40, complete=False)
    checkpoints.rotate(tmp_path, keep_last=2)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30",
                                                                         "checkpoint-40"]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with checkpoints.atomic_directory(target) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with checkpoints.atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
    assert (target / "config.json").is_file() and len(list(tmp_path.iterdir())) == 1


# ---- kill -9 and resume, through the real CLI ----------------------------------------------------------

STEPS, SAVE_EVERY, KILL_AFTER, SAMPLES, BATCH = 16, 4, 8, 24, 2


def stage_for(method: str) -> dict:
    """One stage of ``method`` on bundled data: SFT on VQA-RAD questions, DPO on the bundled preference pairs,
    GRPO on VQA-RAD questions rewarded by answer length (a reward a random model's samples differ in, registered
    by the training process itself: see TRAIN_VERB)."""
    from medtune.paths import bundled_data

    questions = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": SAMPLES}
    return {"sft": {"data": questions},
            "dpo": {"method": "dpo", "data": {"path": "bundled:vqa_rad/tiny-preferences.jsonl", "format": "canonical",
                                              "limit": SAMPLES, "image_root": str(bundled_data("vqa_rad", "images"))}},
            "grpo": {"method": "grpo", "data": questions,
                     "grpo": {"group_size": 2, "max_new_tokens": 4, "beta": 0.04, "rewards": {"length": 1.0}}},
            }[method]


def write_recipe(path: Path, method: str = "sft") -> Path:
    recipe = {
        "model": {"preset": "tiny"}, "output_dir": str(path.parent / "unused"), "report_to": ["none"], "seed": 3,
        "stages": [{
            "name": method, "lr": {"projector": 1e-3, "llm": 1e-3}, "max_steps": STEPS, "batch_size": BATCH,
            "save_steps": SAVE_EVERY, "keep_last_k": 2, "log_steps": 1, "max_length": 256,
            "warmup_ratio": 0.1, **stage_for(method),
        }],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


# `medtune train` through its own parser only, so this test does not depend on the other stages' verbs
TRAIN_VERB = ("import argparse, sys; from medtune.train import cli; from medtune.eval import rewards; "
              "rewards.REWARDS['length'] = lambda items, judge=None: [len(i.prediction) / 10 for i in items]; "
              "parser = argparse.ArgumentParser(); "
              "cli.register(parser.add_subparsers()); args = parser.parse_args(sys.argv[1:]); "
              "sys.exit(args.func(args))")


def train_command(recipe: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", TRAIN_VERB, "train", str(recipe), "--output", str(output), *extra]


def environment() -> dict:
    # two torch threads: where MKL's results depend on the memory alignment of tensors read back from a checkpoint
    # (medtune sets MKL_CBWR so that they do not); the variable is dropped so that medtune's own setting is tested
    environ = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    return {**environ, "MEDTUNE_TORCH_THREADS": "2", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def final_weights(output: Path, method: str) -> dict:
    from safetensors.torch import load_file

    return load_file(output / f"stage-0-{method}" / "model" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_resume_after_kill_9_matches_an_uninterrupted_run(method, tmp_path):
    """For every method: the same data order, RNG states (GRPO's sampling included) and optimizer state, so the
    resumed run ends bitwise where the uninterrupted one does."""
    recipe = write_recipe(tmp_path / "recipe.yaml", method)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(train_command(recipe, reference), check=True, env=environment(), capture_output=True)

    process = subprocess.Popen(train_command(recipe, killed), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / f"stage-0-{method}" / f"checkpoint-{KILL_AFTER}" / checkpoints.COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stage = killed / f"stage-0-{method}"
    assert not (stage / "model").exists()
    latest = checkpoints.latest_complete_checkpoint(stage)
    resumed_at = checkpoints.checkpoint_step(latest)
    steps_per_epoch = SAMPLES // BATCH
    assert KILL_AFTER <= resumed_at < STEPS and resumed_at % steps_per_epoch != 0   # mid-epoch

    done = subprocess.run(train_command(recipe, killed, "--resume"), env=environment(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["resumed_from"] == str(latest) and summary["steps"] == STEPS

    expected, got = final_weights(reference, method), final_weights(killed, method)
    assert expected.keys() == got.keys()
    # bitwise: same data order (seeded sampler + skipped batches), same RNG states, same optimizer state
    mismatched = [name for name in expected if not (expected[name] == got[name]).all()]
    assert mismatched == []
    # the metrics file reads as one run: every step once, in order
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    if method == "grpo":   # the sampled answers' rewards differed, so the steps moved the weights
        assert any(m["reward_std"] > 0 for m in logged)
    # the last K complete checkpoints are kept
    assert [p.name for p in checkpoints.list_checkpoints(stage)] == [f"checkpoint-{STEPS - SAVE_EVERY}",
                                                                      f"checkpoint-{STEPS}"]
