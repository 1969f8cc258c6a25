"""Router and MoE stages through the real CLI on bundled VQA-RAD (organ labels: HEAD, CHEST, ABD).

Properties: the router beats the majority class on images it never saw; an MoE stage trains exactly the parts
with a learning rate (experts only, or experts and router), writes per-domain expert usage that accounts for
every token, and a stage resumed from a checkpoint ends with the weights of an uninterrupted run.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from medtune.cli import main

DATA = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad"}


def write_recipe(tmp_path, stages, **changes) -> str:
    recipe = {"model": {"preset": "tiny"}, "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
              "report_to": ["none"], "defaults": {"batch_size": 4, "max_length": 256, "log_steps": 1},
              "stages": stages, **changes}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


ROUTER = {"name": "router", "data": {**DATA, "limit": 900},
          "router": {"label": "organ", "num_experts": 4, "epochs": 20, "lr": 0.01}}


@pytest.mark.slow
def test_the_router_beats_the_majority_class_on_unseen_images(tmp_path, capsys):
    assert main(["train", write_recipe(tmp_path, [ROUTER])]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "stage-0-router" / "router.json").read_text())
    assert report["classes"] == ["ABD", "CHEST", "HEAD"] and report["experts"] == 4
    held = report["held_out"]
    assert held["samples"] > 50 and set(held["per_class"]) == {"ABD", "CHEST", "HEAD"}
    assert report["accuracy"] > report["majority_accuracy"] + 0.1
    # the confusion table accounts for every held-out sample; nothing is predicted as the class-less expert
    assert sum(map(sum, report["confusion"])) == held["samples"]
    assert all(row[3] == 0 for row in report["confusion"])
    from medtune.models.moe.layers import load_router

    router = load_router(tmp_path / "run" / "stage-0-router" / "router.safetensors")
    assert router["weight"].shape == (4, 32) and router["bias"].shape == (4,)


def _parts_changed(before_vlm, after_vlm) -> set[str]:
    before = dict(before_vlm.model.named_parameters())
    return {after_vlm.part_of(n) for n, p in after_vlm.model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.slow
@pytest.mark.parametrize("rates, expected", [({"experts": 1e-3}, {"experts"}),
                                             ({"experts": 1e-3, "router": 1e-3}, {"experts", "router"})])
def test_an_moe_stage_trains_exactly_its_parts_and_reports_expert_usage(tmp_path, rates, expected):
    from medtune.models.build import load_vlm
    from medtune.train.recipe import load_recipe
    from medtune.train.run import _with_experts

    moe = {"name": "moe", "data": {**DATA, "limit": 24}, "max_steps": 3, "lr": rates,
           "moe": {"layers": [0], "router": "stage:router", "aux_loss_coef": 0.01, "z_loss_coef": 0.001}}
    quick_router = {**ROUTER, "data": {**DATA, "limit": 120}, "router": {**ROUTER["router"], "epochs": 3}}
    path = write_recipe(tmp_path, [quick_router, moe])
    assert main(["train", path]) == 0
    stage = tmp_path / "run" / "stage-1-moe"
    trained = load_vlm(stage / "model")
    assert trained.kind == "moe" and trained.domain_field == "organ"
    recipe = load_recipe(path)
    start = _with_experts(recipe, 1, _dense_start())
    assert _parts_changed(start, trained) == expected
    routing = json.loads((stage / "routing.json").read_text())
    assert routing["domain_field"] == "organ" and set(routing["domains"]) <= {"ABD", "CHEST", "HEAD"}
    counts = torch.tensor(routing["counts"])   # [MoE layers, domains, experts]
    tokens = json.loads((stage / "summary.json").read_text())["tokens"]
    assert counts.shape[0] == 1 and counts.shape[2] == 4 and int(counts.sum()) == tokens
    assert (stage / "routing.md").read_text().count("| expert 0 |") == 1 and (stage / "routing.png").stat().st_size


def _dense_start():
    """The tiny preset the recipe starts from (the router stage does not change it)."""
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec

    return build_vlm(tiny_spec())


@pytest.mark.slow
def test_an_moe_stage_resumed_from_a_checkpoint_ends_as_an_uninterrupted_run(tmp_path):
    from medtune.models.build import load_vlm

    def stages(max_steps):
        return [{"name": "moe", "data": {**DATA, "limit": 32}, "max_steps": max_steps, "save_steps": 2,
                 "schedule": "constant", "warmup_ratio": 0.0, "lr": {"experts": 1e-3, "router": 1e-3},
                 "moe": {"layers": [0], "num_experts": 2}}]

    (tmp_path / "whole").mkdir()
    assert main(["train", write_recipe(tmp_path / "whole", stages(4))]) == 0
    (tmp_path / "resumed").mkdir()
    first = write_recipe(tmp_path / "resumed", stages(2))
    assert main(["train", first]) == 0
    stage = tmp_path / "resumed" / "run" / "stage-0-moe"
    shutil.rmtree(stage / "model")   # as if the run had stopped after checkpoint-2
    (stage / "summary.json").unlink()
    assert main(["train", write_recipe(tmp_path / "resumed", stages(4)), "--resume"]) == 0
    assert json.loads((stage / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
    whole = dict(load_vlm(tmp_path / "whole" / "run" / "stage-0-moe" / "model").model.named_parameters())
    resumed = dict(load_vlm(stage / "model").model.named_parameters())
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


@pytest.mark.slow
def test_lora_on_the_fused_experts_trains_and_merges_into_an_moe_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from medtune.models.build import load_vlm
    from medtune.models.registry import register_model_classes

    stage = {"name": "moe", "data": {**DATA, "limit": 16}, "max_steps": 2, "lr": {"lora": 1e-2},
             "moe": {"layers": [0], "num_experts": 2, "init": "faithful"},
             "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"], "on_experts": True}}
    assert main(["train", write_recipe(tmp_path, [stage])]) == 0
    directory = tmp_path / "run" / "stage-0-moe"
    merged = load_vlm(directory / "model")
    start = load_vlm(directory / "base-model")
    assert merged.kind == start.kind == "moe"
    before = dict(start.model.named_parameters())
    changed = {n for n, p in merged.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".mlp.experts." in n for n in changed) and all("q_proj" in n or ".mlp.experts." in n
                                                               for n in changed)
    register_model_classes()
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(directory / "base-model"),
                                        directory / "adapter").eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (1, 24), generator=generator)
    ids[0, 1:1 + merged.image_tokens_per_image] = merged.image_token_id
    inputs = {"input_ids": ids, "pixel_values": torch.rand(1, 3, merged.image_size, merged.image_size,
                                                             generator=generator)}
    with torch.no_grad():
        torch.testing.assert_close(merged.model.eval()(**inputs).logits, adapted(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)
