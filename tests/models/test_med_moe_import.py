"""``medtune model import`` on Med-MoE checkpoints written by Med-MoE's own code.

The fixture (tests/models/fixtures/seeds/med_moe, README there) holds, for each LM Med-MoE ships (Phi and
StableLM), a tiny stage-2 (``llava_<lm>``) and stage-3 (``moe_llava_<lm>``: 4 experts on layers 0 and 2, top-1,
the meta expert, a router) checkpoint and what Med-MoE's code computed on them as its builder loads them:
``model_vqa_med.py``'s prompt ids (conversation mode ``phi`` / ``stablelm``) and pixels, the logits of a forward
pass and 8 greedy ids, and the answers file of ``model_vqa_med.py``'s loop over six VQA-RAD test questions. The
imported models must give the same numbers, and ``medtune eval run`` on them the same answers.
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

FIXTURE = Path(__file__).parent / "fixtures" / "seeds" / "med_moe"
IMAGE_TOKEN_INDEX = -200   # the image placeholder id inside Med-MoE's prompt ids
VQA_RAD_IMAGES = Path(__file__).parents[2] / "data" / "vqa_rad" / "images"
STAGES = ("stage-2", "stage-3")
LMS = ("phi", "stablelm")
PHI = FIXTURE / "phi"


@pytest.fixture(scope="module", params=LMS)
def lm(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(lm):
    from safetensors.torch import load_file

    return json.loads((FIXTURE / lm / "reference.json").read_text()), load_file(FIXTURE / lm / "reference.safetensors")


@pytest.fixture(scope="module")
def imported_dirs(lm, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp(f"med-moe-{lm}")
    for stage in STAGES:
        assert main(["model", "import", str(FIXTURE / lm / stage), str(out / stage),
                     "--vision-tower", str(FIXTURE / "tower")]) == 0
    return {stage: out / stage for stage in STAGES}


@pytest.fixture(scope="module")
def imported(imported_dirs):
    from medtune.models.build import load_vlm

    return {stage: load_vlm(folder) for stage, folder in imported_dirs.items()}


def seed_ids_for(vlm, ids: list[int]) -> torch.Tensor:
    expanded = []
    for token in ids:
        expanded += [vlm.image_token_id] * vlm.image_tokens_per_image if token == IMAGE_TOKEN_INDEX else [token]
    return torch.tensor([expanded])


def test_stage_2_is_transformers_llava_and_stage_3_medtune_s_moe_kind_with_med_moe_s_routing(lm, imported):
    dense, moe = imported["stage-2"], imported["stage-3"]
    assert type(dense.model).__name__ == "LlavaForConditionalGeneration" and dense.kind == "composed"
    assert dense.model.config.text_config.model_type == {"phi": "phi", "stablelm": "stablelm"}[lm]
    assert dense.model.config.vision_feature_layer == -2
    assert moe.kind == "moe"
    settings = moe.settings
    assert (settings.layer_indices(4), settings.num_experts, settings.top_k) == ([0, 2], 4, 1)
    assert settings.shared_expert and not settings.shared_expert_gate and not settings.renormalize
    assert settings.capacity_factor is None and settings.router_bias   # dropless, a router Linear with bias
    for vlm in (dense, moe):
        assert vlm.template == lm and vlm.pad_mode == "crop" and vlm.image_tokens_per_image == 4
        assert vlm.model.lm_head.bias is None   # Med-MoE's heads have no bias (transformers' Phi has one)
    if lm == "stablelm":   # stablelm_epoch's rope_pct / norm_eps under transformers' names
        text = dense.model.config.text_config
        assert text.rope_parameters["partial_rotary_factor"] == 0.25
        assert (text.layer_norm_eps, text.use_qkv_bias) == (1e-5, True)


@pytest.mark.parametrize("stage", STAGES)
def test_logits_equal_med_moe_s_own_forward(imported, reference, stage):
    meta, tensors = reference
    vlm = imported[stage]
    ids = seed_ids_for(vlm, meta["ids"])
    with torch.no_grad():
        logits = vlm.model(input_ids=ids, pixel_values=tensors["pixel_values"]).logits[0]
    expected = tensors[f"{stage}.logits"]
    # Med-MoE's builder shrinks the LM's rows to its tokenizer; medtune's image token comes after them
    assert expected.shape == (ids.shape[1], meta["tokenizer_length"])
    torch.testing.assert_close(logits[:, :meta["tokenizer_length"]], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", STAGES)
def test_greedy_generation_gives_med_moe_s_ids(imported, reference, stage):
    meta, tensors = reference
    vlm = imported[stage]
    ids = seed_ids_for(vlm, meta["ids"])
    expected = meta[stage]["generated_ids"]
    with torch.no_grad():
        out = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=tensors["pixel_values"], do_sample=False,
                                 max_new_tokens=len(expected), eos_token_id=None)
    assert out[0, ids.shape[1]:].tolist() == expected


def test_pixels_and_prompt_ids_are_model_vqa_med_s(imported, reference):
    """What `medtune eval run` / `serve` send the imported model: the script's crop (no padding) and its ids."""
    meta, tensors = reference
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": meta["question"]}]}]
    for vlm in imported.values():
        with Image.open(VQA_RAD_IMAGES / meta["image"]) as image:
            encoded = vlm.encode_prompt(messages, [image.convert("RGB")])
        torch.testing.assert_close(encoded["pixel_values"], tensors["pixel_values"], atol=1e-6, rtol=0)
        assert encoded["input_ids"].tolist() == seed_ids_for(vlm, meta["ids"]).tolist()
        prompt = vlm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == meta["prompt"].replace("<image>", vlm.image_token)


def config_with(tmp_path: Path, stage: str, change: dict) -> Path:
    folder = tmp_path / stage
    shutil.copytree(PHI / stage, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if key.startswith("moe."):
            config["moe"][key.removeprefix("moe.")] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("stage, change, named", [
    ("stage-3", {"moe.top_k_experts": 2}, "moe.top_k_experts 2"),
    ("stage-3", {"moe.use_residual": True}, "moe.use_residual: true"),
    ("stage-3", {"moe.num_experts": [4, 2]}, "moe.num_experts [4, 2]"),
    ("stage-3", {"moe.ep_size": 2}, "moe.ep_size 2"),
    ("stage-2", {"mm_use_im_start_end": True}, "mm_use_im_start_end: true"),
    ("stage-2", {"image_projector_type": "qformer2_64"}, "image_projector_type 'qformer2_64'"),
    ("stage-2", {"model_type": "llava_qwen"}, "model_type 'llava_qwen'"),
])
def test_settings_medtune_does_not_reproduce_are_refused_by_name(tmp_path, stage, change, named):
    from medtune.models.med_moe_import import MedMoELayout

    with pytest.raises(SpecError, match="cannot import|is not a Med-MoE checkpoint") as error:
        MedMoELayout.read(config_with(tmp_path, stage, change))
    assert named in str(error.value) and "config.json" in str(error.value)


def test_another_conversation_mode_is_refused_before_anything_is_read(tmp_path, capsys):
    assert main(["model", "import", str(PHI / "stage-2"), str(tmp_path / "out"),
                 "--vision-tower", str(FIXTURE / "tower"), "--conv-mode", "vicuna_v1"]) != 0
    assert "conversation mode 'vicuna_v1'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_stage_3_checkpoint_missing_an_expert_is_one_error_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    from medtune.errors import InputFileError
    from medtune.models.med_moe_import import import_med_moe

    folder = tmp_path / "stage-3"
    shutil.copytree(PHI / "stage-3", folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc2.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputFileError, match="MoE layer 2 lacks .*deepspeed_experts.3.fc2.weight"):
        import_med_moe(folder, tmp_path / "out", vision_tower=str(FIXTURE / "tower"))
    assert not (tmp_path / "out").exists()


def test_med_moe_s_stage_1_projector_file_is_read_under_medtune_s_names(tmp_path):
    """Med-MoE's stage 1 writes mm_projector.bin with its image projector one level down
    (model.mm_projector.image_spatial_proj.{0,2}.*): a composed model can start from it."""
    from safetensors.torch import load_file

    from medtune.models.weights import llava_projector_state

    tensors = {key: value for key, value in load_file(PHI / "stage-2" / "model.safetensors").items()
               if "mm_projector" in key}
    torch.save(tensors, tmp_path / "mm_projector.bin")
    state = llava_projector_state(tmp_path / "mm_projector.bin", "mlp2x_gelu")
    assert sorted(state) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert torch.equal(state["linear_2.weight"], tensors["model.mm_projector.image_spatial_proj.2.weight"])


@pytest.mark.parametrize("name", LMS)
def test_med_moe_s_router_file_format_loads_as_a_medtune_router(name):
    """The format of Med-MoE's shipped phi_router.pth / stablelm_router.pth ({fc1.weight, fc1.bias}), written by
    the fixture script with torch.save as Med-MoE's code reads it."""
    from medtune.models.moe.layers import load_router

    path = FIXTURE / name / f"{name}_router.pth"
    state = load_router(path, num_experts=4, hidden_size=32)
    written = torch.load(path, weights_only=True)
    assert torch.equal(state["weight"], written["fc1.weight"]) and torch.equal(state["bias"], written["fc1.bias"])


def test_an_imported_stage_3_trains_its_experts_and_reloads_with_its_routing(imported_dirs, tmp_path):
    """Continue Med-MoE's stage 3 in medtune: experts and ffn train, the router stays as imported (Med-MoE keeps
    it frozen), and the trained model reloads as the moe kind with the same settings."""
    import yaml
    from safetensors.torch import load_file

    from medtune.models.build import load_vlm

    recipe = {"model": str(imported_dirs["stage-3"]), "output_dir": str(tmp_path / "run"), "report_to": ["none"],
              "stages": [{"name": "moe", "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad",
                                                  "limit": 8},
                          "lr": {"experts": 1e-2, "ffn": 1e-2}, "max_steps": 2, "batch_size": 4,
                          "max_length": 256, "save_steps": 2, "log_steps": 1}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    folder = tmp_path / "run" / "stage-0-moe" / "model"
    trained = load_vlm(folder)
    assert trained.kind == "moe" and trained.settings.to_dict() == load_vlm(imported_dirs["stage-3"]).settings.to_dict()
    before, after = load_file(imported_dirs["stage-3"] / "model.safetensors"), load_file(folder / "model.safetensors")
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert any(".experts." in key for key in changed) and any(".shared_expert." in key for key in changed)
    assert not any(".gate." in key or "vision_tower" in key or "self_attn" in key for key in changed)


@pytest.mark.parametrize("stage", STAGES)
def test_eval_run_on_an_import_gives_model_vqa_med_s_answers_file(lm, stage, imported_dirs, tmp_path):
    """`medtune eval run` on the imported model answers the VQA-RAD questions of the fixture's Med-MoE question
    file with the text model_vqa_med.py's loop wrote (greedy, the closed questions' keyword stop, medtune's
    answer budgets)."""
    seed_answers = {str(json.loads(line)["question_id"]): json.loads(line)["text"]
                    for line in (FIXTURE / lm / f"{stage}.vqa_rad_answers.jsonl").read_text().splitlines()}
    asked = {str(q["id"]) for q in json.loads((FIXTURE / "vqa_rad_questions.json").read_text())}
    assert set(seed_answers) == asked and len(asked) == 6
    assert medtune_answers(imported_dirs[stage], asked, tmp_path, prompt_style="med-moe") == seed_answers
