"""Every shipped recipe runs with the tiny override on CPU, and each stage trains exactly its parts."""
from __future__ import annotations

import json

import pytest
import torch

from medtune.paths import project_root
from medtune.train.recipe import load_recipe
from medtune.train.run import run_recipe, stage_dir

RECIPES = sorted(p.stem for p in (project_root() / "recipes").glob("*.yaml") if p.stem != "mix-example")


def test_the_seed_recipes_are_shipped():
    assert {"demo", "llava-med", "pathchat", "gmai-vl", "med-moe"} <= set(RECIPES)


def parameters_by_part(vlm) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, parameter in vlm.model.named_parameters():
        parts.setdefault(vlm.part_of(name), {})[name] = parameter.detach().clone()
    return parts


def initial_model(recipe):
    from medtune.models.presets import build_preset

    settings = dict(recipe.model)
    return build_preset(settings.pop("preset"), **settings)


def upcycled(recipe, index, previous_model_dir):
    """What a moe stage starts from: the previous model with experts made as the stage makes them."""
    from medtune.models.build import load_vlm
    from medtune.train.run import _with_experts

    return _with_experts(recipe, index, load_vlm(previous_model_dir))


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_tiny_and_trains_only_its_parts(name, tmp_path):
    from medtune.models.build import load_vlm
    from medtune.models.templates import get_template

    recipe = load_recipe(project_root() / "recipes" / f"{name}.yaml",
                         [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "report_to=[none]"],
                         tiny=True)
    results = run_recipe(recipe)
    assert [r.steps for r in results] == [0 if s.router is not None else 2 for s in recipe.stages]
    before = parameters_by_part(initial_model(recipe))
    previous = None
    for index, stage in enumerate(recipe.stages):
        directory = stage_dir(recipe.output_dir, index, stage)
        if stage.router is not None:   # a router stage writes a router file and leaves the model as it was
            assert (directory / "router.safetensors").is_file() and not (directory / "model").exists()
            continue
        if stage.moe is not None:
            before = parameters_by_part(upcycled(recipe, index, previous))
        vlm = load_vlm(directory / "model")
        after = parameters_by_part(vlm)
        assert set(after) == set(before), f"{name} stage {stage.name}: parts {sorted(after)} vs {sorted(before)}"
        # LoRA stages merge their adapters: the adapted parts change in the stage's model
        adapted = set() if stage.lora is None else {"llm"} | ({"vision"} if stage.lora.on_vision else set()) | (
            {"experts"} if stage.lora.on_experts else set())
        for part, tensors in after.items():
            changed = [n for n, t in tensors.items() if not torch.equal(t, before[part][n])]
            if getattr(stage.lr, part) > 0 or part in adapted:
                # GRPO learns from answers that score apart; every sampled answer of the tiny random model
                # scores 0 on the strict metric, so no advantage moves it (tests/train/test_grpo.py trains one)
                assert changed or stage.method == "grpo", f"{name} stage {stage.name}: {part} should train"
            else:
                assert changed == [], f"{name} stage {stage.name}: frozen {part} changed: {changed[:3]}"
        # the stage's template, else the recipe model's (a preset model of its own kind brings its own)
        expected_template = stage.template or recipe.model.get("template", initial_model(recipe).template)
        assert vlm.template == expected_template
        assert vlm.tokenizer.chat_template == get_template(expected_template).jinja
        summary = json.loads((directory / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["tokens"] > 0
        before, previous = after, directory / "model"
