"""``medtune model import`` on LLaVA checkpoints written by the seeds' own code.

Each fixture (tests/models/fixtures/seeds/NAME, README there) holds a tiny checkpoint and what the seed's code
computed on it: the evaluation script's prompt ids for two conversation modes, the padded pixels, the logits of
a forward pass and 8 greedy ids. ``llava_med``: LLaVA-Med v1.5 (``llava_mistral``, Mistral LM);
``llava_1_1_3``: LLaVA 1.1.3, the version PathChat's trainer adapts (``model_type: llava``, which is not
transformers' Llava; Llama LM, slow sentencepiece tokenizer); ``llava_1_2``: LLaVA v1.2.2.post1, LLaVA-1.5's code
(``model_type: llava_llama``). The imported model must give the same numbers
through transformers' Llava.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from medtune.cli import main
from medtune.errors import SpecError
from vqa_rad_answers import medtune_answers

SEEDS_DIR = Path(__file__).parent / "fixtures" / "seeds"
FIXTURE = SEEDS_DIR / "llava_med"
IMAGE_TOKEN_INDEX = -200   # LLaVA's image placeholder id inside its prompt ids
# per fixture: the LM, the conversation mode its logits were computed with (-> medtune template), and the other
# mode recorded (-> medtune template)
SEEDS = {"llava_med": {"lm": "mistral", "mode": ("mistral_instruct", "mistral_instruct"),
                       "other": ("vicuna_v1", "vicuna_v1")},
         "llava_1_1_3": {"lm": "llama", "mode": ("llava_llama_2", "llava_llama_2"), "other": ("llava_v1", "vicuna")},
         "llava_1_2": {"lm": "llama", "mode": ("llava_v1", "vicuna"), "other": ("vicuna_v1", "vicuna_v1")}}


@pytest.fixture(scope="module", params=list(SEEDS))
def seed(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(seed):
    from safetensors.torch import load_file

    folder = SEEDS_DIR / seed
    return json.loads((folder / "reference.json").read_text()), load_file(folder / "reference.safetensors")


def import_seed(seed: str, out: Path, mode: str) -> Path:
    folder = SEEDS_DIR / seed
    assert main(["model", "import", str(folder / "checkpoint"), str(out), "--vision-tower", str(folder / "tower"),
                 "--conv-mode", mode]) == 0
    return out


@pytest.fixture(scope="module")
def imported_dir(seed, tmp_path_factory) -> Path:
    return import_seed(seed, tmp_path_factory.mktemp("import") / seed, SEEDS[seed]["mode"][0])


@pytest.fixture(scope="module")
def imported(imported_dir):
    from medtune.models.build import load_vlm

    return load_vlm(imported_dir)


def seed_ids_for(vlm, ids: list[int]) -> torch.Tensor:
    """LLaVA's prompt ids with its -200 placeholder written as this model's image tokens."""
    expanded = []
    for token in ids:
        expanded += [vlm.image_token_id] * vlm.image_tokens_per_image if token == IMAGE_TOKEN_INDEX else [token]
    return torch.tensor([expanded])


def test_the_imported_model_is_transformers_llava_with_the_seed_s_settings(seed, imported, reference):
    meta, _ = reference
    config = imported.model.config
    assert type(imported.model).__name__ == "LlavaForConditionalGeneration"
    assert config.text_config.model_type == SEEDS[seed]["lm"] and config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"   # mm_vision_select_feature: patch
    assert imported.image_tokens_per_image == meta["image_tokens"] == 4
    assert imported.template == SEEDS[seed]["mode"][1] and imported.pad_mode == "pad"


def test_logits_equal_the_seed_s_own_forward(imported, reference):
    meta, tensors = reference
    ids = seed_ids_for(imported, meta["prompts"][meta["logits_for"]]["ids"])
    with torch.no_grad():
        logits = imported.model(input_ids=ids, pixel_values=tensors["pixel_values"][None]).logits[0]
    vocabulary = tensors["logits"].shape[1]   # the image token medtune adds comes after LLaVA's vocabulary
    assert logits.shape[0] == tensors["logits"].shape[0]
    torch.testing.assert_close(logits[:, :vocabulary], tensors["logits"], atol=1e-5, rtol=0)


def test_greedy_generation_gives_the_seed_s_ids(imported, reference):
    meta, tensors = reference
    ids = seed_ids_for(imported, meta["prompts"][meta["logits_for"]]["ids"])
    with torch.no_grad():
        out = imported.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      pixel_values=tensors["pixel_values"][None], do_sample=False,
                                      max_new_tokens=len(meta["generated_ids"]), eos_token_id=None)
    assert out[0, ids.shape[1]:].tolist() == meta["generated_ids"]


def test_pixels_equal_the_seed_s_padding_at_the_centred_offset(seed, imported, reference):
    meta, tensors = reference
    with Image.open(SEEDS_DIR / seed / meta["image"]) as image:
        pixels = imported.pixel_values([image.convert("RGB")])[0]
    torch.testing.assert_close(pixels, tensors["pixel_values_centred"], atol=1e-6, rtol=0)
    if seed != "llava_med":   # LLaVA pads at the centre
        assert meta["pad_offset_drawn"] == 8 and torch.equal(tensors["pixel_values"], tensors["pixel_values_centred"])
    else:   # LLaVA-Med draws the offset (centred or one further); its evaluation's draw here was the other
        assert meta["pad_offset_drawn"] == 9 and not torch.allclose(pixels, tensors["pixel_values"], atol=1e-3)


def test_the_chat_template_writes_the_seed_s_prompt(imported, reference):
    meta, _ = reference
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": meta["question"]}]}]
    prompt = imported.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = meta["prompts"][meta["logits_for"]]["prompt"].replace("<image>", imported.image_token)
    assert prompt.removeprefix(imported.tokenizer.bos_token or "") == expected


@pytest.mark.parametrize("change, named", [
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres'"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end: true"),
    ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu'"),
    ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type 'spatial_unpad'"),
])
def test_settings_medtune_does_not_reproduce_are_refused_by_name(tmp_path, change, named):
    from medtune.models.llava_import import LlavaLayout

    source = tmp_path / "checkpoint"
    source.mkdir()
    config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(SpecError, match="cannot import this LLaVA checkpoint") as error:
        LlavaLayout.read(source)
    assert named in str(error.value) and str(source / "config.json") in str(error.value)


def test_a_pickled_projector_file_is_read_as_tensors_only(tmp_path):
    from medtune.errors import InputFileError
    from medtune.models.weights import llava_projector_state as projector_state

    good = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.ones(2, 2), "model.mm_projector.2.bias": torch.zeros(2)}, good)
    assert sorted(projector_state(good, "mlp2x_gelu")) == ["linear_1.weight", "linear_2.bias"]
    hostile = tmp_path / "hostile.bin"
    torch.save({"model.mm_projector.0.weight": torch.ones(2, 2), "payload": shutil.rmtree}, hostile)
    with pytest.raises(InputFileError, match="never runs code from a checkpoint") as error:
        projector_state(hostile, "mlp2x_gelu")
    assert str(hostile) in str(error.value)


def test_medtune_s_own_prompt_ids_are_the_seed_s(seed, imported, reference):
    """What `medtune eval run` / `serve` send the imported model: model_vqa.py's ids for the mode."""
    meta, _ = reference
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": meta["question"]}]}]
    with Image.open(SEEDS_DIR / seed / meta["image"]) as image:
        encoded = imported.encode_prompt(messages, [image.convert("RGB")])
    expected = seed_ids_for(imported, meta["prompts"][meta["logits_for"]]["ids"])
    assert encoded["input_ids"].tolist() == expected.tolist()


def test_an_imported_model_trains_a_lora_stage_and_reloads(imported_dir, imported, tmp_path):
    import yaml
    from safetensors.torch import load_file

    from medtune.models.build import load_vlm

    recipe = {"model": str(imported_dir), "output_dir": str(tmp_path / "run"), "report_to": ["none"],
              "stages": [{"name": "lora", "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad",
                                                   "limit": 8},
                          "lr": {"projector": 1e-2, "lora": 1e-2}, "lora": {"r": 4, "alpha": 8,
                                                                           "target_modules": ["q_proj", "v_proj"]},
                          "max_steps": 2, "batch_size": 4, "max_length": 384, "save_steps": 2, "log_steps": 1}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    trained = load_vlm(tmp_path / "run" / "stage-0-lora" / "model")
    before, after = load_file(imported_dir / "model.safetensors"), load_file(
        tmp_path / "run" / "stage-0-lora" / "model" / "model.safetensors")
    assert before.keys() == after.keys() and trained.template == imported.template
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert any("multi_modal_projector" in key for key in changed)                 # trained directly
    assert any("q_proj" in key for key in changed) and any("v_proj" in key for key in changed)   # LoRA, merged
    assert not any("vision_tower" in key or "k_proj" in key for key in changed)   # frozen


def test_a_linear_projector_is_imported_into_medtune_s_linear_projector(tmp_path):
    """LLaVA 1.0 / LLaVA-Med 1.0's `linear` projector: `model.mm_projector.weight` / `.bias`, no index (key names
    from LLaVA's projector builder; this checkpoint is the fixture's with its projector replaced)."""
    from safetensors.torch import load_file, save_file

    from medtune.models.build import load_vlm

    source = tmp_path / "linear"
    shutil.copytree(FIXTURE / "checkpoint", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"mm_projector_type": "linear"}))
    state = {k: v for k, v in load_file(source / "model.safetensors").items() if "mm_projector" not in k}
    weight, bias = torch.randn(32, 32, generator=torch.Generator().manual_seed(3)), torch.linspace(-1, 1, 32)
    save_file(state | {"model.mm_projector.weight": weight, "model.mm_projector.bias": bias},
              source / "model.safetensors", metadata={"format": "pt"})
    assert main(["model", "import", str(source), str(tmp_path / "out"), "--vision-tower", str(FIXTURE / "tower")]) == 0
    vlm = load_vlm(tmp_path / "out")
    projector = vlm.model.model.multi_modal_projector
    assert type(vlm.model).__name__ == "MedtuneVLMForConditionalGeneration"
    assert torch.equal(projector.linear.weight, weight) and torch.equal(projector.linear.bias, bias)


def test_the_script_s_other_conversation_mode_gives_its_prompt_ids(seed, tmp_path, reference):
    """LLaVA-Med's model_vqa.py default (vicuna_v1: "a curious user"); LLaVA 1.1.3's (llava_v1: "a curious human",
    medtune's vicuna)."""
    from medtune.models.build import load_vlm

    meta, _ = reference
    mode, template = SEEDS[seed]["other"]
    vlm = load_vlm(import_seed(seed, tmp_path / "out", mode))
    assert vlm.template == template
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": meta["question"]}]}]
    prompt = vlm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.removeprefix(vlm.tokenizer.bos_token) == meta["prompts"][mode]["prompt"].replace(
        "<image>", vlm.image_token)
    with Image.open(SEEDS_DIR / seed / meta["image"]) as image:
        encoded = vlm.encode_prompt(messages, [image.convert("RGB")])
    assert encoded["input_ids"].tolist() == seed_ids_for(vlm, meta["prompts"][mode]["ids"]).tolist()


def projector_spec(tmp_path, hidden: int) -> Path:
    import yaml

    spec = {"vision": str(FIXTURE / "tower"), "tokenizer": "offline", "template": "mistral_instruct",
            "llm": {"model_type": "mistral", "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
            "projector_weights": str(FIXTURE / "mm_projector.bin")}
    path = tmp_path / f"spec-{hidden}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_stage_1_projector_file_starts_a_model_built_from_its_parts(tmp_path):
    """LLaVA's --pretrain_mm_mlp_adapter: a stage-1 mm_projector.bin (written from LLaVA-Med's model, as LLaVA's
    trainer selects the tensors) becomes the projector of a model composed from an LM and the tower."""
    from medtune.models.build import load_vlm

    saved = torch.load(FIXTURE / "mm_projector.bin", weights_only=True)
    assert sorted(saved) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                             "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert main(["model", "build", str(projector_spec(tmp_path, 32)), str(tmp_path / "out")]) == 0
    projector = load_vlm(tmp_path / "out").model.model.multi_modal_projector
    for ours, theirs in (("linear_1", "0"), ("linear_2", "2")):
        for field in ("weight", "bias"):
            assert torch.equal(getattr(getattr(projector, ours), field), saved[f"model.mm_projector.{theirs}.{field}"])


def test_a_projector_file_that_does_not_fit_is_one_error_naming_it(tmp_path, capsys):
    assert main(["model", "build", str(projector_spec(tmp_path, 64)), str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err
    assert f"{FIXTURE / 'mm_projector.bin'}: does not fit the mlp2x_gelu projector" in error
    assert "linear_1.weight (32, 32) where the model has (64, 32)" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_transformers_llava_checkpoint_is_not_taken_for_llava_s_own(tmp_path):
    from medtune.models.llava_import import LlavaLayout

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "llama"},
                                                      "vision_config": {"model_type": "clip_vision_model"}}))
    with pytest.raises(SpecError, match="not a LLaVA checkpoint as LLaVA's own code saves it"):
        LlavaLayout.read(tmp_path)


def test_the_patch_token_llava_s_loader_adds_comes_before_medtune_s_image_token(tmp_path):
    """mm_use_im_patch_token absent counts as true in LLaVA's loader, which adds <im_patch> to the tokenizer and
    resizes the embeddings; the import does the same, so the checkpoint's rows keep their ids."""
    from medtune.models.build import load_vlm
    from safetensors.torch import load_file

    source = tmp_path / "patch-token"
    shutil.copytree(FIXTURE / "checkpoint", source)
    config = json.loads((source / "config.json").read_text())
    del config["mm_use_im_patch_token"]
    (source / "config.json").write_text(json.dumps(config))
    assert main(["model", "import", str(source), str(tmp_path / "out"), "--vision-tower", str(FIXTURE / "tower")]) == 0
    vlm = load_vlm(tmp_path / "out")
    assert vlm.tokenizer.convert_tokens_to_ids("<im_patch>") == 512 and vlm.image_token_id == 513
    meta, tensors = json.loads((FIXTURE / "reference.json").read_text()), load_file(FIXTURE / "reference.safetensors")
    ids = seed_ids_for(vlm, meta["prompts"]["mistral_instruct"]["ids"])
    with torch.no_grad():
        logits = vlm.model(input_ids=ids, pixel_values=tensors["pixel_values"][None]).logits[0]
    torch.testing.assert_close(logits[:, :512], tensors["logits"], atol=1e-5, rtol=0)


def test_a_tower_trained_with_the_model_is_refused_by_name(tmp_path):
    from medtune.models.llava_import import LlavaLayout

    (tmp_path / "config.json").write_text(json.dumps(json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
                                                     | {"unfreeze_mm_vision_tower": True}))
    with pytest.raises(SpecError, match="unfreeze_mm_vision_tower: true"):
        LlavaLayout.read(tmp_path)


def test_a_seed_prompt_style_needs_the_seed_s_conversation_mode(imported_dir, tmp_path, capsys):
    template = json.loads((imported_dir / "medtune.json").read_text())["template"]
    assert main(["eval", "run", "--task", "vqa-rad", "--data", "data/vqa_rad/testset.json", "--model",
                 str(imported_dir), "--prompt-style", "med-moe", "--out", str(tmp_path / "eval")]) == 2
    assert (f"--prompt-style med-moe: {imported_dir} is prompted with template {template!r}, not one of med-moe's "
            "conversation modes (phi, stablelm)") in capsys.readouterr().err
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()


def test_eval_run_on_an_import_gives_the_seed_s_answers_file(seed, imported_dir, tmp_path):
    """`medtune eval run` on the imported model answers VQA-RAD questions (square images: no pad offset to draw)
    with the text the seed's model_vqa.py loop wrote, greedy, at medtune's answer budgets."""
    from medtune.models.build import load_vlm

    seed_answers = {str(json.loads(line)["question_id"]): json.loads(line)["text"]
                    for line in (SEEDS_DIR / seed / "vqa_rad_answers.jsonl").read_text().splitlines()}
    ours = medtune_answers(imported_dir, set(seed_answers), tmp_path, prompt_style="llava-med")
    assert len(ours) == 6
    if seed == "llava_med":   # the same fast tokenizer decodes: the answers file's text itself
        assert ours == seed_answers
    else:
        # LLaVA 1.1.3 decodes with the slow sentencepiece tokenizer, which replaces an invalid UTF-8 byte sequence
        # (a tiny random model writes many) otherwise than the fast one medtune loads; the generated ids are the
        # seed's: the same ids decoded by the imported tokenizer give medtune's answers
        seed_ids = json.loads((SEEDS_DIR / seed / "vqa_rad_answer_ids.json").read_text())
        tokenizer = load_vlm(imported_dir).tokenizer
        assert ours == {k: tokenizer.decode(v, skip_special_tokens=True).strip() for k, v in seed_ids.items()}
