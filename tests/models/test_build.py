"""Composed VLMs: an mlp2x_gelu model loads in plain transformers with identical logits; medtune_vlm
models round-trip losslessly; pretrained parts keep their weights; the image-token count follows the
feature choices; bad specs are refused with the field named."""
import json

import pytest

torch = pytest.importorskip("torch")

from medtune.models.build import SpecError, build_vlm, load_vlm  # noqa: E402
from medtune.models.presets import tiny_spec  # noqa: E402
from medtune.models.templates import get_template  # noqa: E402

torch.set_num_threads(1)


def _inputs(vlm, batch=2, seed=0):
    """Text with one image placeholder run per row, and matching random pixels."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 200, (batch, 6), generator=generator)
    image = torch.full((batch, vlm.image_tokens_per_image), vlm.image_token_id)
    input_ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    pixels = torch.randn(batch, 3, vlm.image_size, vlm.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_mlp2x_gelu_checkpoint_loads_in_plain_transformers_with_identical_logits(tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    vlm = build_vlm(tiny_spec(template="vicuna"))
    assert type(vlm.model) is LlavaForConditionalGeneration
    vlm.save(tmp_path)
    inputs = _inputs(vlm)

    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(plain, inputs), _logits(vlm.model, inputs))
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == get_template("vicuna").jinja
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))

    # AutoProcessor alone expands "<image>" to the number of image tokens the model consumes.
    from PIL import Image

    processor = AutoProcessor.from_pretrained(tmp_path)
    encoded = processor(images=Image.new("RGB", (50, 40)), text="USER: <image>\nWhat is it?", return_tensors="pt")
    assert int((encoded["input_ids"] == vlm.image_token_id).sum()) == vlm.image_tokens_per_image
    assert plain(**encoded).logits.shape[1] == encoded["input_ids"].shape[1]


@pytest.mark.parametrize("projector", ["linear", "attn_pool+mlp2x_gelu"])
def test_medtune_vlm_round_trip_is_lossless(tmp_path, projector):
    from transformers import AutoModelForImageTextToText

    vlm = build_vlm(tiny_spec(projector=projector, template="chatml"))
    assert vlm.model.config.model_type == "medtune_vlm"
    vlm.save(tmp_path)
    loaded = load_vlm(tmp_path)
    inputs = _inputs(vlm)
    assert torch.equal(_logits(loaded.model, inputs), _logits(vlm.model, inputs))
    before, after = vlm.model.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (loaded.template, loaded.image_tokens_per_image, loaded.pad_mode) == ("chatml", vlm.image_tokens_per_image,
                                                                                   "pad")
    assert loaded.tokenizer.chat_template == get_template("chatml").jinja
    # The registered Auto class alone loads it too (what Trainer / PEFT use).
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(auto) is type(vlm.model) and auto.config.projector_type == projector


@pytest.fixture(scope="module")
def pretrained_parts(tmp_path_factory):
    """A tiny Llama LM, a tiny CLIP vision tower and a full CLIP model saved as checkpoints."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from medtune.models.tokenizer import offline_tokenizer

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(123)
    tokenizer = offline_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision_settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)
    CLIPVisionModel(CLIPVisionConfig(**vision_settings)).save_pretrained(root / "vision")
    full = CLIPModel(CLIPConfig(vision_config=vision_settings,
                                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4), projection_dim=16))
    full.save_pretrained(root / "clip")
    return root


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "attn_pool+mlp2x_gelu"])
def test_parts_named_by_checkpoint_keep_their_weights(pretrained_parts, projector):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    vlm = build_vlm(tiny_spec(vision=str(pretrained_parts / "vision"), llm=str(pretrained_parts / "llm"),
                              tokenizer=None, projector=projector))
    tower = CLIPVisionModel.from_pretrained(pretrained_parts / "vision")
    llm = LlamaForCausalLM.from_pretrained(pretrained_parts / "llm")
    _assert_same_weights(vlm.model.model.vision_tower, tower)
    _assert_same_weights(vlm.model.model.language_model, llm.model)
    assert torch.equal(vlm.model.lm_head.weight, llm.lm_head.weight)


def test_vision_half_of_a_full_clip_checkpoint_is_used(pretrained_parts):
    from transformers import CLIPModel

    vlm = build_vlm(tiny_spec(vision=str(pretrained_parts / "clip"), llm=str(pretrained_parts / "llm"),
                              tokenizer=None))
    full = CLIPModel.from_pretrained(pretrained_parts / "clip")
    _assert_same_weights(vlm.model.model.vision_tower, full.vision_model)


def test_pretrained_tower_refuses_another_image_size(pretrained_parts):
    with pytest.raises(SpecError, match="trained at image_size 32, not 64"):
        build_vlm(tiny_spec(vision=str(pretrained_parts / "vision"), image_size=64))


def _assert_same_weights(module, reference):
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


# 32 px images with 8 px patches: 16 patches; CLIP adds one CLS token.
@pytest.mark.parametrize("select, projector, expected", [
    ("patch", "mlp2x_gelu", 16), ("cls_patch", "mlp2x_gelu", 17), ("patch", "linear", 16),
    ("cls_patch", "linear", 17), ("patch", "attn_pool+mlp2x_gelu", 8), ("cls_patch", "attn_pool+mlp2x_gelu", 8),
])
def test_image_tokens_per_image_follow_the_feature_choice(select, projector, expected):
    vlm = build_vlm(tiny_spec(vision_feature_select=select, projector=projector, projector_queries=8))
    assert vlm.image_tokens_per_image == expected
    inputs = _inputs(vlm)
    assert _logits(vlm.model, inputs).shape[1] == inputs["input_ids"].shape[1]
    # One placeholder too few is a mismatch the model itself detects.
    short = {**inputs, "input_ids": inputs["input_ids"][:, 1:].clone()}
    short["input_ids"][:, 1] = 7
    short["attention_mask"] = inputs["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match="do not match"):
        vlm.model(**short)


def test_siglip_tower_has_no_cls_so_patch_means_all_tokens():
    siglip = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    vlm = build_vlm(tiny_spec(vision=siglip))
    assert vlm.image_tokens_per_image == 16
    assert vlm.model.config.vision_feature_select_strategy == "full"
    assert list(vlm.image_processor.image_mean) == [0.5, 0.5, 0.5]   # SigLIP's statistics (pad_mode: LLaVA's)
    assert _logits(vlm.model, _inputs(vlm)).shape[1] == 16 + 6
    with pytest.raises(SpecError, match="needs a tower with a CLS token"):
        build_vlm(tiny_spec(vision=siglip, vision_feature_select="cls_patch"))


def test_feature_layer_choice_changes_the_image_features_and_is_range_checked():
    penultimate = build_vlm(tiny_spec(vision_feature_layer=-2))
    last = build_vlm(tiny_spec(vision_feature_layer=-1))  # same seed: identical weights
    inputs = _inputs(penultimate)
    assert not torch.equal(_logits(penultimate.model, inputs), _logits(last.model, inputs))
    # The tiny tower has 2 layers: hidden states are embeddings + 2, so -3..2 are valid.
    with pytest.raises(SpecError, match="vision_feature_layer -4 is out of range.*use -3..2"):
        build_vlm(tiny_spec(vision_feature_layer=-4))


def test_saved_metadata_and_dtype(tmp_path):
    vlm = build_vlm(tiny_spec(projector="linear", dtype="bfloat16", pad_mode="crop"))
    assert {p.dtype for p in vlm.model.parameters()} == {torch.bfloat16}
    vlm.save(tmp_path)
    metadata = json.loads((tmp_path / "medtune.json").read_text())
    assert metadata["pad_mode"] == "crop" and metadata["spec"]["projector"] == "linear"
    loaded = load_vlm(tmp_path)
    assert loaded.model.dtype == torch.bfloat16 and loaded.pad_mode == "crop"
    assert load_vlm(tmp_path, dtype="float32").model.dtype == torch.float32


@pytest.mark.parametrize("overrides, message", [
    ({"projector": "mlp3x"}, "ModelSpec.projector: 'mlp3x' is not one of"),
    ({"vision_feature_select": "cls"}, "ModelSpec.vision_feature_select"),
    ({"pad_mode": "stretch"}, "ModelSpec.pad_mode"),
    ({"template": "alpaca"}, "ModelSpec.template: 'alpaca' is not one of plain, vicuna"),
    ({"tokenizer": None}, "ModelSpec.tokenizer: an LLM built from a config has no tokenizer"),
    ({"llm": {"model_type": None, "hidden_size": 8}}, "ModelSpec.llm: a config dict needs a model_type"),
    ({"image_mean": [0.5, 0.5]}, "ModelSpec.image_mean needs 3 values"),
    ({"colour": "red"}, r"unknown model spec keys \['colour'\]"),
])
def test_bad_specs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(SpecError, match=message):
        tiny_spec(**overrides)


def test_load_vlm_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
        load_vlm(tmp_path)


LLM_WIDTHS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize("family, extra", [
    ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    ("mistral", {"num_key_value_heads": 2}),
    ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    ("stablelm", {"num_key_value_heads": 4}),
    ("phi", {"num_key_value_heads": 4}),
])
def test_llm_families_round_trip_with_a_new_image_token(tmp_path, family, extra):
    """A new image token grows the vocabulary by one; tied embeddings stay tied; Phi's LM-head bias
    (which transformers' Llava class cannot hold) makes the model a medtune_vlm instead of losing it."""
    from transformers import AutoModelForImageTextToText

    vlm = build_vlm(tiny_spec(llm={"model_type": family, **LLM_WIDTHS, **extra}, image_token="<img>"))
    assert vlm.model.config.text_config.vocab_size == len(vlm.tokenizer) == 2049
    assert vlm.image_token_id == 2048
    tied = extra.get("tie_word_embeddings", False)
    assert (vlm.model.lm_head.weight is vlm.model.get_input_embeddings().weight) == tied
    has_bias = vlm.model.lm_head.bias is not None
    assert vlm.model.config.model_type == ("medtune_vlm" if has_bias else "llava")
    assert has_bias == (family == "phi")
    if has_bias:
        torch.nn.init.normal_(vlm.model.lm_head.bias)  # a trained head's bias is not zero
    vlm.save(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    inputs = _inputs(vlm)
    assert torch.equal(_logits(loaded, inputs), _logits(vlm.model, inputs))


def test_pretrained_parts_load_in_the_target_dtype(pretrained_parts):
    vlm = build_vlm(tiny_spec(vision=str(pretrained_parts / "vision"), llm=str(pretrained_parts / "llm"),
                              tokenizer=None, dtype="bfloat16"))
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM.from_pretrained(pretrained_parts / "llm", dtype=torch.bfloat16)
    assert {p.dtype for p in vlm.model.parameters()} == {torch.bfloat16}
    _assert_same_weights(vlm.model.model.language_model, llm.model)


def test_missing_local_part_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ModelSpec.llm: no checkpoint at /.*/nowhere"):
        build_vlm(tiny_spec(llm=str(tmp_path / "nowhere"), tokenizer="offline"))


def test_native_template_needs_a_tokenizer_with_a_chat_template():
    with pytest.raises(SpecError, match="has none; pick a medtune template"):
        build_vlm(tiny_spec(template="native"))


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_llava_processor_is_rebuilt_when_a_checkpoint_has_none(tmp_path, select):
    """Training checkpoints may hold only weights, tokenizer, image processor and medtune.json."""
    from PIL import Image

    vlm = build_vlm(tiny_spec(vision_feature_select=select))
    vlm.save(tmp_path)
    (tmp_path / "processor_config.json").unlink()
    loaded = load_vlm(tmp_path)
    encoded = loaded.processor(images=Image.new("RGB", (32, 32)), text="USER: <image> hi", return_tensors="pt")
    assert int((encoded["input_ids"] == loaded.image_token_id).sum()) == vlm.image_tokens_per_image
    assert torch.equal(_logits(loaded.model, encoded), _logits(vlm.model, encoded))
