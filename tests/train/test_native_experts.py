"""Experts are a component any kind holds: a native family (a tiny Qwen2-VL, transformers' own class) goes through
Med-MoE's stages in `medtune train` on bundled VQA-RAD: a router stage on the organ label, then a stage whose
``moe`` section (the ``med-moe`` preset) upcycles the LLM's FFNs. The stage trains exactly the parts it names,
routes every token and reports expert usage per organ, saves a model that reloads as the native kind with
identical logits, and, resumed from a checkpoint, ends with the weights of an uninterrupted run."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

torch = pytest.importorskip("torch")

from medtune.cli import main  # noqa: E402

DATA = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad"}
ROUTER = {"name": "router", "data": {**DATA, "limit": 48},
          "router": {"label": "organ", "classes": ["ABD", "CHEST", "HEAD"], "epochs": 5, "lr": 0.05}}


def _moe_stage(max_steps: int) -> dict:
    return {"name": "moe", "data": {**DATA, "limit": 16}, "max_steps": max_steps, "save_steps": 2,
            "schedule": "constant", "warmup_ratio": 0.0, "lr": {"experts": 1e-3, "router": 1e-3},
            "moe": {"preset": "med-moe", "layers": [0], "num_experts": 3, "router": "stage:router",
                    "aux_loss_coef": 0.01}}


def _recipe(folder, max_steps: int) -> str:
    folder.mkdir(exist_ok=True)
    recipe = {"model": {"preset": "tiny-qwen2-vl"}, "output_dir": str(folder / "run"),
              "cache_dir": str(folder / "cache"), "report_to": ["none"],
              "defaults": {"batch_size": 2, "max_length": 256, "log_steps": 1},
              "stages": [ROUTER, _moe_stage(max_steps)]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.slow
def test_a_native_model_with_experts_trains_routes_reloads_and_resumes_exactly(tmp_path):
    from medtune.models.build import load_vlm
    from medtune.models.kinds.base import MEDTUNE_FILE
    from medtune.models.presets import build_preset

    assert main(["train", _recipe(tmp_path / "whole", 4)]) == 0
    stage = tmp_path / "whole" / "run" / "stage-1-moe"
    trained = load_vlm(stage / "model")
    assert trained.kind == "native" and type(trained.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert trained.experts.domain_field == "organ" and trained.experts.layers == [0]
    assert json.loads((stage / "model" / MEDTUNE_FILE).read_text())["experts"]["moe"]["num_experts"] == 3

    # exactly the named parts trained: experts and router changed, every other parameter is the preset's
    start = build_preset("tiny-qwen2-vl").with_experts(trained.experts.settings)
    before = dict(start.model.named_parameters())
    changed = {trained.part_of(n) for n, p in trained.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"experts", "router"}

    # every token of every sample is routed and counted under its organ
    routing = json.loads((stage / "routing.json").read_text())
    assert routing["domain_field"] == "organ" and set(routing["domains"]) <= {"ABD", "CHEST", "HEAD"}
    counts = torch.tensor(routing["counts"])   # [1 MoE layer, organs, 3 experts]
    assert counts.shape[0] == 1 and counts.shape[2] == 3 and counts.sum() > 0
    assert (stage / "routing.md").read_text().count("| expert 0 |") == 1

    # reloads with identical logits (the same model object saved, then read back)
    saved_again = tmp_path / "saved-again"
    trained.save(saved_again)
    reloaded = load_vlm(saved_again)
    prompt = trained.encode_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                   "text": "Is this the chest?"}]}],
                                   [_image()])
    with torch.no_grad():
        assert torch.equal(reloaded.model(**prompt).logits, trained.model(**prompt).logits)

    # stopped after checkpoint-2 and resumed: the weights of the uninterrupted run
    assert main(["train", _recipe(tmp_path / "resumed", 2)]) == 0
    resumed_stage = tmp_path / "resumed" / "run" / "stage-1-moe"
    shutil.rmtree(resumed_stage / "model")
    (resumed_stage / "summary.json").unlink()
    assert main(["train", _recipe(tmp_path / "resumed", 4), "--resume"]) == 0
    assert json.loads((resumed_stage / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
    whole = dict(trained.model.named_parameters())
    resumed = dict(load_vlm(resumed_stage / "model").model.named_parameters())
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 40, 3), dtype=np.uint8))


@pytest.mark.slow
def test_a_lora_stage_after_experts_merges_into_a_model_that_keeps_them(tmp_path):
    """The merge reads the base with its experts: a LoRA stage on the attention leaves every expert weight as the
    experts stage wrote it."""
    from medtune.models.build import load_vlm

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    stages = [{"name": "moe", "data": {**DATA, "limit": 8}, "max_steps": 2, "lr": {"experts": 1e-3},
               "moe": {"layers": [0], "num_experts": 2}},
              {"name": "lora", "data": {**DATA, "limit": 8}, "max_steps": 2, "lr": {"lora": 1e-2}, "lora": lora}]
    recipe = {"model": {"preset": "tiny-qwen2-vl"}, "output_dir": str(tmp_path / "run"),
              "cache_dir": str(tmp_path / "cache"), "report_to": ["none"],
              "defaults": {"batch_size": 2, "max_length": 256, "log_steps": 1}, "stages": stages}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    experts = load_vlm(tmp_path / "run" / "stage-0-moe" / "model")
    merged = load_vlm(tmp_path / "run" / "stage-1-lora" / "model")
    assert merged.experts is not None and merged.experts.layers == [0]
    before = dict(experts.model.named_parameters())
    changed = {merged.part_of(n) for n, p in merged.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"llm"}   # the merged q/v projections, nothing of the experts
