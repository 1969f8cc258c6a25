"""``medtune model import`` on a checkpoint written by PathChat's training code (fixture and how it was made:
fixtures/seeds/pathchat/README.md): its ``coca_vit-l`` tower (timm's ViT-L read after its final norm, class
token kept) and ``attn_pool+mlp2x_gelu`` projector (queries narrower than the tower) give the seed's numbers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from medtune.cli import main  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "seeds" / "pathchat"
IMAGE_TOKEN_INDEX = -200


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURE / "reference.json").read_text()), load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from medtune.models.build import load_vlm

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("import") / "pathchat"
    assert main(["model", "import", str(FIXTURE / "checkpoint"), str(out)]) == 0
    return load_vlm(out)


def _ids(vlm, ids):
    expanded = []
    for token in ids:
        expanded += [vlm.image_token_id] * vlm.image_tokens_per_image if token == IMAGE_TOKEN_INDEX else [token]
    return torch.tensor([expanded])


def test_the_tower_and_the_attention_pool_give_the_seed_s_features(imported, reference):
    meta, tensors = reference
    config = imported.model.config
    assert (config.projector_type, config.projector_queries, config.projector_heads) == ("attn_pool+mlp2x_gelu", 128, 8)
    assert config.projector_query_width == 16 and config.vision_config.hidden_size == 32
    assert config.vision_feature_source == "last_hidden_state" and config.vision_feature_select_strategy == "full"
    assert imported.image_tokens_per_image == meta["image_tokens"] == 128
    with torch.no_grad():
        features = imported.model.model.vision_tower(pixel_values=tensors["pixel_values"][None]).last_hidden_state
        projected = imported.model.model.multi_modal_projector(features)
    torch.testing.assert_close(features, tensors["tower_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(projected, tensors["projected"], atol=1e-5, rtol=0)


def test_pixels_prompt_logits_and_greedy_ids_are_the_seed_s(imported, reference):
    meta, tensors = reference
    with Image.open(FIXTURE / meta["image"]) as image:
        rgb = image.convert("RGB")
    torch.testing.assert_close(imported.pixel_values([rgb])[0], tensors["pixel_values"], atol=1e-6, rtol=0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": meta["question"]}]}]
    encoded = imported.encode_prompt(messages, [rgb])
    ids = _ids(imported, meta["ids"])
    assert encoded["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        logits = imported.model(input_ids=ids, pixel_values=tensors["pixel_values"][None]).logits[0]
        out = imported.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      pixel_values=tensors["pixel_values"][None], do_sample=False,
                                      max_new_tokens=8, eos_token_id=None)
    vocabulary = tensors["logits"].shape[1]   # medtune's image token comes after the seed's vocabulary
    torch.testing.assert_close(logits[:, :vocabulary], tensors["logits"], atol=1e-5, rtol=0)
    assert out[0, ids.shape[1]:].tolist() == meta["generated_ids"]


def test_the_import_reloads_in_plain_transformers_with_the_same_logits(imported, reference, tmp_path):
    from plain_python import run_without_medtune

    meta, tensors = reference
    imported.save(tmp_path / "model")
    ids = _ids(imported, meta["ids"])
    with torch.no_grad():
        ours = imported.model(input_ids=ids, pixel_values=tensors["pixel_values"][None]).logits
    script = ("import torch\nfrom transformers import AutoModelForImageTextToText\n"
              "from safetensors.torch import load_file, save_file\n"
              "model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
              "inputs = load_file(sys.argv[2])\n"
              "with torch.no_grad():\n"
              "    logits = model(input_ids=inputs['ids'], pixel_values=inputs['pixels']).logits\n"
              "save_file({'logits': logits.contiguous()}, sys.argv[3])\n")
    from safetensors.torch import save_file

    save_file({"ids": ids, "pixels": tensors["pixel_values"][None].contiguous()}, str(tmp_path / "inputs.safetensors"))
    run_without_medtune(script, tmp_path, str(tmp_path / "model"), str(tmp_path / "inputs.safetensors"),
                        str(tmp_path / "logits.safetensors"))
    torch.testing.assert_close(load_file(str(tmp_path / "logits.safetensors"))["logits"], ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("change", "message"), [
    ({"mm_vision_tower": "coca_vit-b"}, "mm_vision_tower 'coca_vit-b' (PathChat's code builds coca_vit-l)"),
    ({"mm_vision_select_layer": -2}, "mm_vision_select_layer other than -1"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end: true"),
])
def test_what_pathchat_s_code_would_not_run_is_refused_by_name(tmp_path, capsys, change, message):
    source = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE / "checkpoint", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | change))
    assert main(["model", "import", str(source), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "cannot import this PathChat checkpoint" in error and message in error


def test_without_its_tower_file_the_import_says_so(tmp_path, capsys):
    source = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE / "checkpoint", source)
    (source / "vision_tower.pt").unlink()
    assert main(["model", "import", str(source), str(tmp_path / "out")]) == 2
    assert "no vision_tower.pt beside the checkpoint (PathChat's builder loads the tower from it)" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_the_import_trains_a_lora_stage_with_a_frozen_tower_and_reloads(imported, tmp_path):
    """A LoRA stage (tower frozen) trains the projector and the LM, leaves the tower, and the result reloads with
    PathChat's feature source; the frozen tower's feature cache selects the final-norm tokens as the model does."""
    import yaml
    from safetensors.torch import load_file as read

    from medtune.models.build import load_vlm

    from medtune.models.kinds.composed import TowerFeatureCache

    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cache = TowerFeatureCache(imported.model.model.vision_tower, imported.model.config)
    with torch.no_grad():
        expected = imported.model.model.vision_tower(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(cache(pixels), expected, atol=0, rtol=0)
    imported.save(tmp_path / "model")
    recipe = {"model": str(tmp_path / "model"), "output_dir": str(tmp_path / "run"), "report_to": ["none"],
              "stages": [{"name": "lora", "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad",
                                                   "limit": 4},
                          "lr": {"projector": 1e-2, "lora": 1e-2}, "lora": {"r": 4, "alpha": 8,
                                                                           "target_modules": ["q_proj", "v_proj"]},
                          "max_steps": 2, "batch_size": 2, "max_length": 384, "save_steps": 2, "log_steps": 1}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    folder = tmp_path / "run" / "stage-0-lora" / "model"
    trained = load_vlm(folder)
    assert trained.model.config.vision_feature_source == "last_hidden_state"
    before, after = read(str(tmp_path / "model" / "model.safetensors")), read(str(folder / "model.safetensors"))
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert any("multi_modal_projector" in key for key in changed)
    assert not any("vision_tower" in key for key in changed)
