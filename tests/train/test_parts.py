"""What trains: freezing by part, LoRA placement, per-part learning-rate groups."""
from __future__ import annotations

import pytest
import torch

from medtune.train.parts import apply_trainable_parts, parameter_groups
from medtune.train.recipe import LearningRates, LoraSpec, RecipeError

from train_helpers import IMAGE_SIZE, composed, part_of, synthetic_samples, tiny_llava


def trainable_parts(model) -> set[str]:
    return {part_of(n) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rates, expected", [
    (LearningRates(projector=2e-3), {"projector"}),
    (LearningRates(projector=1e-4, vision=1e-5), {"projector", "vision"}),
    (LearningRates(projector=1e-5, vision=1e-5, llm=1e-5), {"projector", "vision", "llm"}),
    (LearningRates(llm=1e-5), {"llm"}),
])
def test_learning_rate_zero_freezes_exactly_that_part(rates, expected):
    model = apply_trainable_parts(composed(), tiny_llava(), rates)
    assert trainable_parts(model) == expected
    # every parameter of a trained part trains (the LLM's embeddings and head included)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (part_of(name) in expected), name


def test_unknown_parameter_names_are_refused():
    with pytest.raises(ValueError, match="belongs to no known part"):
        part_of("encoder.layers.0.weight")


def test_parameter_groups_carry_each_parts_learning_rate_and_no_decay_for_norms():
    rates = LearningRates(projector=1e-3, vision=1e-4, llm=1e-5)
    model = apply_trainable_parts(composed(), tiny_llava(), rates)
    decay = {n for n, _ in model.named_parameters() if n.endswith(".weight") and "norm" not in n}
    groups = parameter_groups(model, part_of, rates, weight_decay=0.1, decay_names=decay)
    by_part = {}
    for group in groups:
        by_part.setdefault(group["part"], set()).add(group["lr"])
        assert group["weight_decay"] in (0.0, 0.1)
    assert by_part == {"projector": {1e-3}, "vision": {1e-4}, "llm": {1e-5}}
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)
    norm_ids = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if id(p) in norm_ids)


def one_step(model, groups) -> dict:
    """One AdamW step on a synthetic image batch; returns the parameters before the step."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sample = synthetic_samples(1)[0]
    batch = {
        "input_ids": torch.tensor([sample["input_ids"]]),
        "attention_mask": torch.tensor([sample["attention_mask"]]),
        "labels": torch.tensor([sample["labels"]]),
        "pixel_values": torch.tensor(sample["pixel_values"]).reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE),
    }
    optimizer = torch.optim.AdamW(groups)
    model(**batch).loss.backward()
    optimizer.step()
    return before


def test_one_step_moves_trained_parts_only():
    rates = LearningRates(projector=1e-2)
    model = apply_trainable_parts(composed(), tiny_llava(), rates)
    before = one_step(model, parameter_groups(model, part_of, rates, 0.0, set()))
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        assert changed == (part_of(name) == "projector"), name


def test_lora_goes_on_the_llm_only_and_the_projector_trains_whole():
    rates = LearningRates(projector=1e-4, lora=2e-4)
    model = apply_trainable_parts(composed(), tiny_llava(), rates, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lora_names = [n for n, p in model.named_parameters() if part_of(n) == "lora"]
    assert lora_names and all("language_model" in n for n in lora_names)
    # q_proj exists in the vision tower too: it must not get an adapter
    assert not any("vision_tower" in n for n in lora_names)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {part_of(n) for n in trained} == {"lora", "projector"}
    assert all("modules_to_save" in n for n in trained if part_of(n) == "projector")
    groups = parameter_groups(model, part_of, rates, 0.0, set())
    assert {g["part"]: g["lr"] for g in groups} == {"lora": 2e-4, "projector": 1e-4}
    before = one_step(model, groups)
    frozen_llm = [n for n, p in model.named_parameters() if part_of(n) == "llm"]
    assert all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in frozen_llm)


def test_lora_on_vision_adds_adapters_to_both_towers():
    rates = LearningRates(lora=1e-4)
    model = apply_trainable_parts(composed(), tiny_llava(), rates, LoraSpec(r=2, alpha=4, target_modules=["q_proj"],
                                                                 on_vision=True))
    lora_names = [n for n, p in model.named_parameters() if part_of(n) == "lora"]
    assert any("vision_tower" in n for n in lora_names) and any("language_model" in n for n in lora_names)
    assert trainable_parts(model) == {"lora"}


def test_lora_with_no_matching_layer_is_a_recipe_error():
    with pytest.raises(RecipeError, match="lora.target_modules: none of \\['c_attn'\\]"):
        apply_trainable_parts(composed(), tiny_llava(), LearningRates(lora=1e-4), LoraSpec(target_modules=["c_attn"]))
