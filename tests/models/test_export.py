"""Checkpoints other engines load as medtune does (medtune.models.export, the export contract).

* Weights are written under released checkpoints' key names (``vision_tower.vision_model.*`` for CLIP and SigLIP
  towers, ``language_model.model.*``), also by a bare ``save_pretrained`` as Trainer calls it; medtune and plain
  transformers load that layout and the two older ones with identical logits.
* A Python where medtune cannot be imported (a subprocess whose import system refuses ``medtune``) loads every
  checkpoint with ``AutoProcessor`` and ``AutoModelForImageTextToText(trust_remote_code=True)``, and gets
  bit-identical pixels on every bundled VQA-RAD image (pad, crop and resize modes), the prompt ids medtune
  builds, and medtune's logits: Llava natively, medtune_vlm (attention pool; Phi's LM-head bias) and
  medtune_moe_vlm from the code copied beside the weights.
* ``pad`` is LLaVA's expand2square: the LLaVA background colour int(mean * 255), then CLIP's resize.
"""
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from medtune.models.build import build_vlm, load_vlm  # noqa: E402
from medtune.models.moe.settings import MoESettings  # noqa: E402
from medtune.models.presets import tiny_spec  # noqa: E402
from medtune.models.vision import pad_mode_of  # noqa: E402
from plain_python import run_without_medtune  # noqa: E402

torch.set_num_threads(1)

VQA_RAD_IMAGES = Path(__file__).resolve().parents[2] / "data" / "vqa_rad" / "images"
QUESTION = "Is there evidence of an aortic aneurysm?"
SIGLIP = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
QWEN2 = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "tie_word_embeddings": True}
PHI = {"model_type": "phi", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}
# a checkpoint per pad mode has its pixels compared on every VQA-RAD image
PAD_MODES = {"pad": "llava-clip-llama", "crop": "llava-siglip-qwen2", "resize": "attn-pool"}
TOWER_KEYS = ("vision_tower.vision_model.embeddings.", "vision_tower.vision_model.encoder.layers.0.")

# Run by plain_python.run_without_medtune: a Python where medtune cannot be imported.
PLAIN_TRANSFORMERS = r'''
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

torch.set_num_threads(1)
job = json.loads(open(sys.argv[1]).read())
images = [Image.open(path).convert("RGB") for path in job["images"]]
report = {}
for name, folder in job["checkpoints"].items():
    processor = AutoProcessor.from_pretrained(folder)
    some = images if name in job["all_images"] else images[:1]
    pixels = processor.image_processor(images=some, return_tensors="pt")["pixel_values"]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "text", "text": job["question"]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"pixels": pixels, "input_ids": inputs["input_ids"], "logits": logits.contiguous()},
              f"{job['out']}/{name}.safetensors")
    report[name] = {"model_module": type(model).__module__,
                    "image_processor": type(processor.image_processor).__name__}
report["medtune_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "medtune")
json.dump(report, open(f"{job['out']}/report.json", "w"))
'''


def _spec(name):
    return {"llava-clip-llama": tiny_spec(),
            "llava-siglip-qwen2": tiny_spec(vision=SIGLIP, llm=QWEN2, pad_mode="crop"),
            "attn-pool": tiny_spec(projector="attn_pool+mlp2x_gelu", pad_mode="resize"),
            "phi-head-bias": tiny_spec(llm=PHI)}[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (vlm, folder)}: two Llava models (CLIP + Llama, SigLIP + Qwen2), two medtune_vlm models and an
    upcycled MoE model, each saved by medtune."""
    saved = {}
    for name in ("llava-clip-llama", "llava-siglip-qwen2", "attn-pool", "phi-head-bias", "moe"):
        if name == "moe":
            vlm = build_vlm(tiny_spec()).with_experts(MoESettings(layers=[0], expert_noise=0.5, seed=1))
        else:
            vlm = build_vlm(_spec(name))
        folder = tmp_path_factory.mktemp(name)
        vlm.save(folder)
        saved[name] = (vlm, folder)
    return saved


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    paths = sorted(VQA_RAD_IMAGES.glob("*.jpg"))
    assert len(paths) == 315
    return paths, [Image.open(path).convert("RGB") for path in paths]


@pytest.fixture(scope="module")
def medtune_pixels(checkpoints, images):
    """{pad mode: medtune's pixel values of every VQA-RAD image}."""
    return {mode: checkpoints[name][0].pixel_values(images[1]) for mode, name in PAD_MODES.items()}


@pytest.fixture(scope="module")
def plain(checkpoints, images, tmp_path_factory):
    """What a Python without medtune computes from each checkpoint: {name: tensors}, plus its report."""
    from safetensors.torch import load_file

    work = tmp_path_factory.mktemp("plain")
    job = {"checkpoints": {name: str(folder) for name, (_, folder) in checkpoints.items()},
           "images": [str(path) for path in images[0]], "all_images": list(PAD_MODES.values()), "question": QUESTION,
           "out": str(work)}
    (work / "job.json").write_text(json.dumps(job))
    run_without_medtune(PLAIN_TRANSFORMERS, work, str(work / "job.json"))
    report = json.loads((work / "report.json").read_text())
    return {name: load_file(str(work / f"{name}.safetensors")) for name in checkpoints}, report


def _keys(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


def _medtune_inputs(vlm, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return vlm.encode_prompt(messages, [image])


def _logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


# ---- key layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llava-clip-llama", "llava-siglip-qwen2"])
def test_llava_checkpoints_have_the_released_key_layout(checkpoints, name):
    keys = _keys(checkpoints[name][1])
    assert all(any(key.startswith(prefix) for key in keys) for prefix in TOWER_KEYS)
    assert not any(key.startswith(("vision_tower.embeddings", "vision_tower.encoder", "model.")) for key in keys)
    assert any(key.startswith("language_model.model.layers.0.") for key in keys)
    assert any(key.startswith("multi_modal_projector.linear_1.") for key in keys)


def test_medtune_classes_keep_released_tower_keys_and_one_key_per_expert(checkpoints):
    for name in ("attn-pool", "phi-head-bias", "moe"):
        assert any(key.startswith("model.vision_tower.vision_model.encoder.") for key in _keys(checkpoints[name][1]))
    keys = _keys(checkpoints["moe"][1])
    assert any(".mlp.experts.3.down_proj.weight" in key for key in keys)
    assert not any(key.endswith(("experts.gate_up_proj", "experts.down_proj")) for key in keys)


def test_a_bare_save_pretrained_as_trainer_calls_it_writes_the_released_layout(checkpoints, tmp_path):
    vlm, folder = checkpoints["llava-clip-llama"]
    vlm.model.save_pretrained(tmp_path / "built")              # a model composed in memory
    load_vlm(folder).model.save_pretrained(tmp_path / "loaded")  # and one loaded back
    assert _keys(tmp_path / "built") == _keys(tmp_path / "loaded") == _keys(folder)


@pytest.mark.parametrize("layout", ["older medtune", "in-memory"])
def test_other_layouts_load_in_medtune_and_plain_transformers_with_identical_logits(checkpoints, images, tmp_path,
                                                                                    layout):
    """Checkpoints older medtune versions wrote (tower without vision_model., the tower's own image processor)
    and transformers' own module tree (save_original_format=False) load as well, with the image processor of
    their pad mode; saved again, they come out in the released layout."""
    import shutil

    from transformers import AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    vlm, folder = checkpoints["llava-siglip-qwen2"]
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    model = vlm.model
    if layout == "older medtune":   # what save_pretrained did for a model built in memory
        model._weight_conversions = [transform for transform in get_model_conversion_mapping(model, add_legacy=False)
                                     if not isinstance(transform, PrefixChange)]
        model.save_pretrained(other)
        assert any(key.startswith("vision_tower.encoder.") for key in _keys(other))
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(other)
    else:
        model.save_pretrained(other, save_original_format=False)
        assert any(key.startswith("model.vision_tower.encoder.") for key in _keys(other))
    vlm.__post_init__()   # back to the released layout for the other tests
    inputs = _medtune_inputs(vlm, images[1][0])
    expected = _logits(vlm.model, inputs)
    reloaded = load_vlm(other)
    assert pad_mode_of(reloaded.image_processor) == "crop"
    assert torch.equal(reloaded.pixel_values(images[1][:3]), vlm.pixel_values(images[1][:3]))
    assert torch.equal(_logits(reloaded.model, inputs), expected)
    assert torch.equal(_logits(AutoModelForImageTextToText.from_pretrained(other), inputs), expected)
    reloaded.save(tmp_path / "again")
    assert _keys(tmp_path / "again") == _keys(folder)


# ---- a Python without medtune -------------------------------------------------------------------------------


def test_the_plain_python_never_imported_medtune_and_ran_the_copied_code(plain):
    _, report = plain
    assert report.pop("medtune_modules") == []
    for name, seen in report.items():
        native = name.startswith("llava-")
        assert seen["model_module"].startswith("transformers.models.llava.") == native, (name, seen)
        assert seen["image_processor"] == "LlavaImageProcessorPil"   # torchvision does not import here


@pytest.mark.parametrize("mode", PAD_MODES)
def test_without_medtune_the_saved_processor_gives_medtune_s_pixels_on_every_vqa_rad_image(checkpoints,
                                                                                          medtune_pixels, plain,
                                                                                          mode):
    assert checkpoints[PAD_MODES[mode]][0].pad_mode == mode
    assert torch.equal(plain[0][PAD_MODES[mode]]["pixels"], medtune_pixels[mode])   # bit for bit


@pytest.mark.parametrize("name", ["llava-clip-llama", "llava-siglip-qwen2", "attn-pool", "phi-head-bias", "moe"])
def test_without_medtune_the_checkpoint_gives_medtune_s_prompt_ids_and_logits(checkpoints, images, plain, name):
    vlm, _ = checkpoints[name]
    theirs = plain[0][name]
    inputs = _medtune_inputs(vlm, images[1][0])
    assert torch.equal(theirs["pixels"][:1], inputs["pixel_values"])
    assert theirs["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert torch.equal(theirs["logits"], _logits(vlm.model, inputs))


def test_pad_mode_is_llava_s_expand2square_with_its_background_colour(checkpoints, images, medtune_pixels):
    """The oracle is LLaVA's code path: paste on a square of int(mean * 255), then CLIP's resize and normalise."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vlm, _ = checkpoints["llava-clip-llama"]
    processor = vlm.image_processor
    colour = tuple(int(x * 255) for x in processor.image_mean)
    assert colour == (122, 116, 104)
    clip = CLIPImageProcessorPil(size={"shortest_edge": vlm.image_size},
                                 crop_size={"height": vlm.image_size, "width": vlm.image_size},
                                 image_mean=processor.image_mean, image_std=processor.image_std)
    non_square = [index for index, image in enumerate(images[1]) if image.width != image.height]
    assert len(non_square) == 266

    def expand2square(image):
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), colour)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return canvas

    expected = clip(images=[expand2square(images[1][index]) for index in non_square],
                    return_tensors="pt")["pixel_values"]
    assert torch.equal(medtune_pixels["pad"][non_square], expected)


def test_remote_code_is_medtune_s_modules_with_relative_imports(checkpoints):
    from medtune.models.export import relative_imports

    folder = checkpoints["moe"][1]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "model.MedtuneMoEVLMForConditionalGeneration"
    files = {path.name for path in folder.glob("*.py")}
    assert files == {"model.py", "medtune_vlm.py", "projectors.py", "layers.py", "settings.py", "errors.py"}
    source = Path(__file__).resolve().parents[2] / "medtune" / "models" / "moe" / "model.py"
    copied = (folder / "model.py").read_text()
    assert copied.endswith(relative_imports(source.read_text())[0]) and "\nfrom medtune" not in copied
    assert not list(checkpoints["llava-clip-llama"][1].glob("*.py"))   # a native class needs no code


def test_an_import_of_medtune_that_cannot_be_copied_is_refused_with_its_line():
    from medtune.models.export import relative_imports

    assert relative_imports("from medtune.models.moe.layers import MoEBlock\n")[0] == "from .layers import MoEBlock\n"
    with pytest.raises(ValueError, match=r"<source>:2: .*imports from a package"):
        relative_imports("import torch\nfrom medtune.models import moe\n")
    with pytest.raises(ValueError, match=r"<source>:1: `import medtune"):
        relative_imports("import medtune.models.moe\n")


def test_a_merged_lora_checkpoint_of_a_medtune_class_keeps_the_contract(checkpoints, tmp_path):
    """``medtune merge`` writes what VLM.save writes: released tower keys, the remote code and its auto_map."""
    from medtune.train.merge import merge_checkpoint
    from medtune.train.parts import apply_trainable_parts
    from medtune.train.recipe import LearningRates, LoraSpec

    vlm = build_vlm(_spec("attn-pool"))
    base = checkpoints["attn-pool"][1]
    model = apply_trainable_parts(vlm, vlm.model, LearningRates(lora=1e-3),
                                  LoraSpec(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(tmp_path / "checkpoint-1")
    merged = merge_checkpoint(tmp_path / "checkpoint-1", tmp_path / "merged")
    assert _keys(merged) == _keys(base)
    assert {path.name for path in merged.glob("*.py")} == {"medtune_vlm.py", "projectors.py"}
    assert json.loads((merged / "config.json").read_text())["auto_map"] == \
        json.loads((base / "config.json").read_text())["auto_map"]
