"""MedMax's released layouts in medtune, checked on a tiny checkpoint written by MedMax's own code (fixture and how it
was made: fixtures/seeds/medmax/README.md).

The Hugging Face Chameleon layout MedMax's converter writes (as ``mint-medmax/medmax_7b_hf`` was made) loads as the
discrete kind with the seed class's logits, Chameleon's image tokenizer's pixels and codes, and the VQGAN decoder of
Chameleon's tokenizer folder (``vqgan.yaml`` + ``vqgan.ckpt``, read without running pickles) decoding as Chameleon's
``VQModel`` does; ``export-chameleon`` writes back the original ``consolidated.pth`` bit for bit, in a folder laid
out as Chameleon's loader and MedMax's converter read it (the converter's run on it is recorded in the README)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from medtune.models.build import load_vlm  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "seeds" / "medmax"


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def medmax():
    torch.set_num_threads(1)
    vlm = load_vlm(FIXTURE / "hf", dtype="float32")
    vlm.attach_decoder(FIXTURE / "chameleon" / "tokenizer")
    return vlm


def test_the_hf_layout_loads_as_the_discrete_kind_with_the_seed_s_logits(medmax, reference):
    from medtune.models.chameleon import MedtuneChameleonForConditionalGeneration

    assert medmax.kind == "discrete" and type(medmax.model) is MedtuneChameleonForConditionalGeneration
    # the converter renames <reserved08707> to <image>; the block markers and end of turn keep Chameleon's names
    vocab = medmax.tokenizer.get_vocab()
    assert medmax.image_token_id == vocab["<image>"] and "<reserved08707>" not in vocab
    assert [medmax.token_id(t) for t in ("<racm3:break>", "<eoss>", "<reserved08706>")] == \
        [vocab["<racm3:break>"], vocab["<eoss>"], vocab["<reserved08706>"]]
    with torch.no_grad():
        logits = medmax.model(input_ids=reference["input_ids"]).logits
    assert torch.allclose(logits, reference["logits"], atol=1e-5, rtol=0)


def test_pixels_and_codes_equal_chameleon_s_image_tokenizer(medmax, reference):
    image = Image.open(FIXTURE / "image.png")   # RGBA with translucent pixels: blended onto white first
    assert image.mode == "RGBA"
    assert torch.equal(medmax.image_tokenizer.preprocess([image]), reference["pixels"])
    codes = medmax.image_tokenizer.encode([image])
    assert torch.equal(codes.reshape(-1), reference["codes"])
    assert len(set(reference["codes"].tolist())) >= 5   # codes that differ, so an order mistake would show
    ids = medmax.image_tokenizer.codes_to_token_ids(codes).reshape(-1)
    assert torch.equal(ids, reference["hf_codes"].reshape(-1))   # the seed class's get_image_tokens


def test_the_tokenizer_folder_s_vqgan_decodes_as_chameleon_s_vq_model(medmax, reference):
    decoder = medmax.image_tokenizer.decoder
    with torch.no_grad():
        pixels = decoder(reference["codes"][None])
    assert torch.allclose(pixels, reference["decoded"], atol=1e-5, rtol=0)
    # the image: Chameleon's _pil_from_chw_tensor rule (clamp to [-1, 1], to [0, 255], truncated)
    image = np.asarray(medmax.image_tokenizer.decode(reference["codes"][None])[0])
    expected = ((reference["decoded"][0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255
    assert np.abs(image.astype(int) - expected.astype(np.uint8).astype(int)).max() <= 1


@pytest.fixture(scope="module")
def imported_release(tmp_path_factory):
    """MedMax's Chameleon-layout release (mint-medmax/medmax_7b's layout) through `medtune model import`."""
    from medtune.cli import main

    out = tmp_path_factory.mktemp("import") / "medmax_7b"
    assert main(["model", "import", str(FIXTURE / "chameleon"), str(out)]) == 0
    return load_vlm(out, dtype="float32")


def test_the_chameleon_layout_imports_as_the_converter_s_checkpoint(imported_release, medmax, reference):
    """Every weight (the VQ encoder's too), the settings, the vocabulary map and the tokenizer's ids equal those of
    the Hugging Face checkpoint MedMax's converter wrote from the same release; the decoder comes along."""
    ours, theirs = imported_release.model.state_dict(), medmax.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "vocab_size", "max_position_embeddings", "swin_norm", "vocabulary_map",
                 "bos_token_id", "eos_token_id"):
        assert getattr(imported_release.model.config, name) == getattr(medmax.model.config, name), name
    assert imported_release.model.config.rope_parameters["rope_theta"] == medmax.model.config.rope_parameters["rope_theta"]
    for name in ("num_embeddings", "embed_dim", "latent_channels", "resolution", "base_channels", "channel_multiplier"):
        assert getattr(imported_release.model.config.vq_config, name) == getattr(medmax.model.config.vq_config, name)
    for text in ("Describe <image> the lung.", "<reserved08706><racm3:break>IMGIMGBZ<eoss>", "  two  spaces\n"):
        assert imported_release.tokenizer(text).input_ids == medmax.tokenizer(text).input_ids
    assert imported_release.tokenizer("a", "b").input_ids == medmax.tokenizer("a", "b").input_ids
    with torch.no_grad():
        logits = imported_release.model(input_ids=reference["input_ids"]).logits
        pixels = imported_release.image_tokenizer.decoder(reference["codes"][None])
    assert torch.allclose(logits, reference["logits"], atol=1e-5, rtol=0)
    assert torch.allclose(pixels, reference["decoded"], atol=1e-5, rtol=0)


def test_a_release_import_takes_no_llava_options_and_one_model_at_a_time(tmp_path, capsys):
    import shutil

    from medtune.cli import main

    assert main(["model", "import", str(FIXTURE / "chameleon"), str(tmp_path / "a"), "--conv-mode", "vicuna_v1"]) == 2
    assert "a Chameleon-layout release has no vision tower or LLaVA conversation mode" in capsys.readouterr().err
    release = tmp_path / "two"
    shutil.copytree(FIXTURE / "chameleon", release)
    shutil.copytree(release / "models" / "7b", release / "models" / "30b")
    assert main(["model", "import", str(release), str(tmp_path / "b")]) == 2
    assert "2 model folders under models/ (30b, 7b); import one release at a time" in capsys.readouterr().err
    shutil.rmtree(release / "models" / "30b")
    (release / "tokenizer" / "vqgan.ckpt").unlink()
    assert main(["model", "import", str(release), str(tmp_path / "c")]) == 2
    assert "a Chameleon release needs tokenizer/vqgan.ckpt beside models/" in capsys.readouterr().err
    (release / "models" / "7b" / "consolidated.pth").rename(release / "models" / "7b" / "consolidated.00.pth")
    assert main(["model", "import", str(release), str(tmp_path / "d")]) == 2
    assert "a sharded release (consolidated.00.pth ...), which medtune does not read" in capsys.readouterr().err


def _digest(tensor) -> str:
    return hashlib.sha256(tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_export_gives_back_the_original_weights_in_a_folder_chameleon_s_loader_reads(tmp_path):
    from medtune.cli import main

    out = tmp_path / "models" / "7b"
    assert main(["model", "export-chameleon", str(FIXTURE / "hf"), str(out)]) == 0
    saved = torch.load(out / "consolidated.pth", weights_only=True)
    original = json.loads((FIXTURE / "digests.json").read_text())["original consolidated.pth"]
    assert {key: _digest(value) for key, value in saved.items() if value is not None} == original
    # Chameleon's loader: asserts rope.freqs is the one unexpected key; reads consolidate_params.json beside
    # params.json and merges {**params, **params["model"], **consolidate_params}; sizes the FFN from multiple_of
    assert "rope.freqs" in saved and saved["rope.freqs"] is None
    params = json.loads((out / "params.json").read_text())
    merged = {**params, **params["model"], **json.loads((out / "consolidate_params.json").read_text())}
    assert merged["model_parallel_size"] == 1 and "n_kv_heads" not in merged   # the converter reads it as GQA
    hidden = int(2 * (4 * merged["dim"]) / 3)
    if merged.get("ffn_dim_multiplier") is not None:
        hidden = int(merged["ffn_dim_multiplier"] * hidden)
    hidden = merged["multiple_of"] * -(-hidden // merged["multiple_of"])
    assert hidden == saved["layers.0.feed_forward.w1.weight"].shape[0] == 96
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize(("dim", "intermediate"), [(4096, 11008), (32, 96), (32, 64), (100, 50), (256, 1024)])
def test_the_ffn_width_survives_chameleon_s_rule(dim, intermediate):
    from medtune.models.chameleon import _ffn_params

    params = _ffn_params(dim, intermediate)
    hidden = int(params.get("ffn_dim_multiplier", 1) * int(2 * (4 * dim) / 3))
    assert params["multiple_of"] * -(-hidden // params["multiple_of"]) == intermediate
    assert (params == {"multiple_of": 256}) == (dim == 4096)   # the released 7B value where it works


@pytest.mark.slow
def test_the_released_layout_trains_a_lora_stage_and_reloads(tmp_path):
    """Continue training: a LoRA stage on bundled VQA-RAD (images become codes of the checkpoint's own VQ), merged;
    the merged checkpoint reloads as the discrete kind, with only the adapted weights changed."""
    import yaml
    from safetensors.torch import load_file as read

    from medtune.cli import main

    recipe = {"model": str(FIXTURE / "hf"), "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
              "report_to": ["none"],
              "stages": [{"name": "sft", "max_steps": 2, "batch_size": 2, "max_length": 384, "lr": {"lora": 1e-2},
                          "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 6},
                          "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    model_dir = tmp_path / "run" / "stage-0-sft" / "model"
    trained = load_vlm(model_dir)
    assert trained.kind == "discrete"
    before, after = read(str(FIXTURE / "hf" / "model.safetensors")), read(str(model_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key].float(), after[key].float())}
    assert changed and all(key.endswith(("q_proj.weight", "v_proj.weight")) for key in changed)


def test_attach_decoder_makes_the_released_layout_answer_with_images(tmp_path, reference, capsys):
    import shutil

    from medtune.cli import main
    from medtune.models.generation import GenerationSettings, Generator, ImageSampling

    checkpoint = tmp_path / "medmax_7b_hf"
    shutil.copytree(FIXTURE / "hf", checkpoint)
    with pytest.raises(ValueError, match="no image decoder attached"):
        Generator(load_vlm(checkpoint)).complete([[{"role": "user", "content": "Draw."}]], [[]],
                                                 GenerationSettings(modalities=("image",)))
    assert main(["model", "attach-decoder", str(checkpoint), str(tmp_path)]) == 2
    assert f"error: {tmp_path}: neither vqgan_decoder.safetensors nor vqgan.yaml + vqgan.ckpt\n" \
        in capsys.readouterr().err
    assert main(["model", "attach-decoder", str(checkpoint), str(FIXTURE / "chameleon" / "tokenizer")]) == 0
    assert not list(checkpoint.glob("*.partial"))
    vlm = load_vlm(checkpoint, dtype="float32")
    with torch.no_grad():
        assert torch.allclose(vlm.image_tokenizer.decoder(reference["codes"][None]), reference["decoded"], atol=1e-5)
    settings = GenerationSettings(max_new_tokens=70, modalities=("image",), image=ImageSampling(temperature=0))
    answer = Generator(vlm).complete([[{"role": "user", "content": "Draw a chest X-ray."}]], [[]], settings)[0]
    assert len(answer.images) == 1 and answer.images[0].size == (32, 32)


def test_attach_decoder_refuses_a_model_that_writes_no_image_codes(tmp_path, capsys):
    from medtune.cli import main
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec

    build_vlm(tiny_spec()).save(tmp_path / "composed")
    assert main(["model", "attach-decoder", str(tmp_path / "composed"), str(FIXTURE / "chameleon" / "tokenizer")]) == 2
    assert f"error: {tmp_path / 'composed'}: a composed model writes no image codes, so it takes no image decoder" \
        in capsys.readouterr().err
    assert not (tmp_path / "composed" / "vqgan_decoder.safetensors").exists()
