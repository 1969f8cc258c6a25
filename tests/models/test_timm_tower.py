"""A timm Vision Transformer (UNI's kind: layer scale, class token, no head) as a vision tower: ``medtune model
import-tower`` writes transformers' DINOv2 model, whose outputs equal timm's own forward on a fixture timm saved
(fixtures/seeds/timm_vit/README.md), and a composed model uses it like any tower."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from medtune.cli import main  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "seeds" / "timm_vit"


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tower") / "uni-like"
    assert main(["model", "import-tower", str(FIXTURE / "checkpoint"), str(out)]) == 0
    return out


def test_the_imported_tower_returns_timm_s_features_and_every_block_s_output(tower_dir):
    from transformers import AutoModel

    reference = load_file(str(FIXTURE / "reference.safetensors"))
    tower = AutoModel.from_pretrained(tower_dir).eval()
    assert type(tower).__name__ == "Dinov2Model"
    assert (tower.config.num_attention_heads, tower.config.image_size, tower.config.patch_size) == (4, 32, 8)
    with torch.no_grad():
        out = tower(pixel_values=reference["pixels"], output_hidden_states=True)
    assert torch.allclose(out.last_hidden_state, reference["features"], atol=1e-5, rtol=0)   # forward_features
    assert torch.allclose(out.pooler_output, reference["pooled"], atol=1e-5, rtol=0)          # the class token
    for index in range(2):
        assert torch.allclose(out.hidden_states[index + 1], reference[f"block.{index}"], atol=1e-5, rtol=0)
    processor = json.loads((tower_dir / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]


def test_a_composed_model_uses_the_imported_tower(tower_dir):
    from PIL import Image

    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec

    vlm = build_vlm(tiny_spec(vision=str(tower_dir)))
    assert vlm.image_tokens_per_image == 16   # a 4 x 4 grid of patches; the class token left out, as LLaVA does
    assert list(vlm.processor.image_processor.image_mean) == [0.485, 0.456, 0.406]
    image = Image.new("RGB", (40, 30), (120, 60, 200))
    encoded = vlm.encode_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                                [image])
    reference = load_file(str(FIXTURE / "reference.safetensors"))
    tower = vlm.model.model.vision_tower if hasattr(vlm.model, "model") else vlm.model.vision_tower
    with torch.no_grad():
        assert torch.allclose(tower(pixel_values=reference["pixels"]).last_hidden_state, reference["features"],
                              atol=1e-5, rtol=0)
        logits = vlm.model(**encoded).logits
    assert logits.shape[1] == encoded["input_ids"].shape[1] and torch.isfinite(logits).all()


def _variant(tmp_path, *, config=None, extra=None, drop=()):
    folder = tmp_path / "variant"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    if config:
        settings = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(settings | config))
    if extra or drop:
        weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
        weights = {k: v for k, v in weights.items() if k not in drop} | (extra or {})
        torch.save(weights, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(("change", "message"), [
    (dict(extra={"reg_token": torch.zeros(1, 4, 32)}), "this ViT has register tokens (reg_token)"),
    (dict(extra={"blocks.0.attn.q_norm.weight": torch.ones(8)}), "this ViT has q/k normalisation (attn.q_norm)"),
    (dict(drop=("cls_token",)), "this ViT has no class token"),
    (dict(config={"architecture": "convnext_base"}), "timm architecture 'convnext_base' is not a Vision Transformer"),
    (dict(config={"architecture": "vit_weird_patch8", "model_args": {}}), "cannot tell the number of attention heads"),
    (dict(drop=("norm.weight", "norm.bias"), extra={"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32)}),
     "this ViT has no final norm (norm.*; a global_pool='avg' model keeps fc_norm instead)"),
    (dict(config={"model_args": {"num_heads": 5}}), "width 32 is not divisible by 5 attention heads"),
])
def test_what_the_dinov2_layout_cannot_hold_is_refused_by_name(tmp_path, capsys, change, message):
    source = _variant(tmp_path, **change)
    assert main(["model", "import-tower", str(source), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"error: {source}: " in error and message in error
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_timm_s_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    assert main(["model", "import-tower", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a timm checkpoint (a config.json with 'architecture'" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["model", "import-tower", str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"error: {tmp_path / 'config.json'}: not valid JSON (" in capsys.readouterr().err


def test_without_model_args_the_head_count_comes_from_the_architecture_s_name(tmp_path):
    """UNI's own config.json names vit_large_patch16_224 and passes no num_heads: timm's ViT-L has 16 heads."""
    from transformers import AutoConfig

    source = _variant(tmp_path, config={"architecture": "vit_medium_patch8_32", "model_args": {}})
    assert main(["model", "import-tower", str(source), str(tmp_path / "out")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "out").num_attention_heads == 8   # timm's ViT-M
