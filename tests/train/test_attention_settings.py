"""Attention implementation and packing mode as recipe settings: every allowed pair keeps packed samples exactly
apart (per-sample loss packed == unpacked, through the stage's own collator), every refused pair names its keys."""
from __future__ import annotations

import pytest
import torch

from medtune.models.batch import IGNORE_INDEX
from medtune.models.packing import ATTENTION_MODES, default_mode, pair_refusal, sample_spans
from medtune.train.recipe import RecipeError, check_environment, parse_recipe

torch.set_num_threads(1)

DATA = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 4}


def recipe(model=None, **stage):
    settings = {"name": "sft", "data": DATA, "lr": {"projector": 1e-3}, "max_length": 512, **stage}
    return {"model": model or {"preset": "tiny"}, "output_dir": "runs/x", "stages": [settings]}


def error_of(raw) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    return str(info.value)


# ---- the settings ---------------------------------------------------------------------------------------


def test_attn_implementation_is_a_model_setting():
    parsed = parse_recipe(recipe({"preset": "tiny", "template": "plain", "attn_implementation": "eager"}))
    assert parsed.attn_implementation == "eager" and parsed.model == {"preset": "tiny", "template": "plain"}
    parsed = parse_recipe(recipe({"checkpoint": "some/model", "attn_implementation": "sdpa"}))
    assert (parsed.model, parsed.attn_implementation) == ("some/model", "sdpa")
    assert parse_recipe(recipe("some/model")).attn_implementation is None   # the model's own choice
    assert error_of(recipe({"preset": "tiny", "attn_implementation": "flash"})) == (
        "model.attn_implementation: 'flash' is not one of eager, sdpa, flex_attention, flash_attention_2")
    top_level = {**recipe(), "attn_implementation": "sdpa"}
    assert error_of(top_level) == "attn_implementation: a model setting; write it as model.attn_implementation"
    assert error_of(recipe({"checkpoint": "some/model", "template": "plain"})).startswith(
        "model.template: a checkpoint takes only attn_implementation beside it")


def test_packing_names_a_mode_and_true_follows_the_attention_implementation():
    assert parse_recipe(recipe(packing="flatten")).stages[0].packing == "flatten"
    assert parse_recipe(recipe(packing=True)).stages[0].packing is True
    assert error_of(recipe(packing="varlen")) == (
        "stages[0].packing: expected true, false or one of position_ids, mask, flatten, got str 'varlen'")
    assert {impl: default_mode(impl) for impl in ("flash_attention_2", "sdpa", "flex_attention", "eager")} == {
        "flash_attention_2": "flatten", "sdpa": "mask", "flex_attention": "position_ids", "eager": "position_ids"}


@pytest.mark.parametrize("mode, implementation", [("mask", "flash_attention_2"), ("mask", "flex_attention")])
def test_refused_pairs_name_both_keys(mode, implementation):
    message = error_of(recipe({"preset": "tiny", "attn_implementation": implementation}, packing=mode))
    assert message.startswith(f"stages[0].packing: {mode!r} with model.attn_implementation {implementation!r}: ")
    assert pair_refusal(mode, implementation) in message


def test_flash_attention_needs_cuda_and_its_package(monkeypatch):
    parsed = parse_recipe(recipe({"preset": "tiny", "attn_implementation": "flash_attention_2"}, packing=True))
    with pytest.raises(RecipeError, match=r"^model.attn_implementation: flash_attention_2 needs a CUDA GPU"):
        check_environment(parsed, device="cpu")
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "flash_attn" else real_find_spec(name))
    with pytest.raises(RecipeError, match=r"^model.attn_implementation: flash_attention_2 needs the flash-attn"):
        check_environment(parsed, device="cuda")


# ---- exactness of every allowed pair, through the recipe's own wiring --------------------------------------


def _stage_model_and_collator(raw):
    """What run_stage makes of the recipe: the model (with model.attn_implementation) and the stage's collator."""
    from medtune.train.run import load_stage_model, stage_collator

    parsed = parse_recipe(raw)
    vlm, _ = load_stage_model(parsed, 0)
    return parsed, vlm, stage_collator(vlm, parsed.stages[0], "stages[0]")


def _samples(vlm, n: int = 4):
    from medtune.data.formats import default_image_root, read_records
    from medtune.data.jsonl import Tally
    from medtune.paths import bundled_data

    path = bundled_data("vqa_rad", "trainset.json")
    samples = [s for _, s in zip(range(n), read_records("vqa-rad", path, tally=Tally()))]
    return [vlm.encode_sample(s, default_image_root("vqa-rad", path), max_length=512) for s in samples]


def _sharpen(model) -> None:
    """Larger random weights, so that a token seeing across samples moves the loss far above the tolerance."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _mean_loss(logits, labels) -> float:
    targets = labels[1:]
    losses = torch.nn.functional.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return losses[targets != IGNORE_INDEX].mean().item()


def _unpacked_losses(vlm, encoded) -> list[float]:
    pad = vlm.collator(packing=False)
    losses = []
    for example in encoded:
        batch = pad([example])
        labels = batch.pop("labels")
        with torch.no_grad():
            losses.append(_mean_loss(vlm.model(**batch).logits[0], labels[0]))
    return losses


def _packed_losses(vlm, collator, encoded) -> list[float]:
    """Per-sample losses of one packed batch of rows [0, 1] and [2, 3] (one row of all in flatten mode)."""
    rows = [[0, 1], [2, 3]]
    batch = collator([[encoded[i] for i in row] for row in rows])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = vlm.model(**batch).logits
    positions = batch["position_ids"][0] if batch["position_ids"].dim() == 3 else batch["position_ids"]
    if logits.shape[0] == 1:   # flatten: every sample in one row, in order
        rows = [[0, 1, 2, 3]]
    losses = {}
    for r, row in enumerate(rows):
        for index, (start, end) in zip(row, sample_spans(positions[r])):
            assert end - start == len(encoded[index]["input_ids"])
            losses[index] = _mean_loss(logits[r, start:end], labels[r, start:end])
    return [losses[i] for i in range(len(encoded))]


def _mode(collator) -> str:
    while not hasattr(collator, "attention"):   # kinds wrap the packing collator
        collator = collator.collator
    return collator.attention


ALLOWED = [pytest.param(mode, impl, id=f"{mode}-{impl}",
                         # flex_attention compiles its kernel on first use: half a minute on 2 CPU cores
                         marks=[pytest.mark.slow] if impl == "flex_attention" else [])
           for impl in ("eager", "sdpa", "flex_attention") for mode in (*ATTENTION_MODES, True)
           if pair_refusal(default_mode(impl) if mode is True else mode, impl) is None]


@pytest.mark.parametrize("mode, implementation", ALLOWED)
def test_each_allowed_pair_gives_the_unpacked_per_sample_loss(mode, implementation):
    raw = recipe({"preset": "tiny", "attn_implementation": implementation}, packing=mode, max_length=200)
    parsed, vlm, collator = _stage_model_and_collator(raw)
    assert vlm.model.config._attn_implementation == implementation
    assert _mode(collator) == (default_mode(implementation) if mode is True else mode)
    _sharpen(vlm.model)
    encoded = _samples(vlm)
    unpacked = _unpacked_losses(vlm, encoded)
    packed = _packed_losses(vlm, collator, encoded)
    assert packed == pytest.approx(unpacked, abs=1e-4)


NATIVE = [("tiny-qwen2-vl", mode) for mode in (*ATTENTION_MODES, True)] + [("tiny-gemma3", True),
                                                                             ("tiny-gemma3", "flatten")]


@pytest.mark.parametrize("preset, mode", NATIVE, ids=[f"{p}-{m}" for p, m in NATIVE])
def test_native_packing_is_exact(preset, mode):
    """Qwen2-VL packs with each sample's own multimodal rotary positions; Gemma 3's token-type mask (image tokens
    see each other both ways; 2 layers make it reach the loss) is kept: sdpa's default falls back from mask to
    position_ids."""
    model = {"preset": preset, "attn_implementation": "sdpa", **({"text_layers": 2} if preset == "tiny-gemma3" else {})}
    parsed, vlm, collator = _stage_model_and_collator(recipe(model, packing=mode, max_length=200))
    expected = {True: "position_ids" if preset == "tiny-gemma3" else "mask"}.get(mode, mode)
    assert _mode(collator) == expected
    _sharpen(vlm.model)
    vlm.model.train()   # Gemma 3 builds its bidirectional image mask in training
    encoded = _samples(vlm)
    assert _packed_losses(vlm, collator, encoded) == pytest.approx(_unpacked_losses(vlm, encoded), abs=1e-4)


def test_a_mode_the_model_cannot_run_exactly_is_refused_naming_the_keys():
    from medtune.models.presets import tiny_gemma3
    from medtune.train.run import stage_collator

    parsed = parse_recipe(recipe({"preset": "tiny-gemma3"}, packing="mask"))
    with pytest.raises(RecipeError) as info:
        stage_collator(tiny_gemma3(), parsed.stages[0], "stages[0]")
    message = str(info.value)
    assert message.startswith("stages[0].packing: packing mode 'mask' is not exact for this model")
    assert "model.attn_implementation" in message
