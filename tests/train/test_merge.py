"""medtune merge: the merged model loads with transformers alone and gives the adapter model's logits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from medtune.errors import UserError
from medtune.train.merge import merge_checkpoint
from medtune.train.parts import apply_trainable_parts
from medtune.train.recipe import LearningRates, LoraSpec


@pytest.fixture(scope="module")
def adapter_checkpoint(tmp_path_factory):
    """A tiny VLM saved as base, plus a LoRA checkpoint with non-zero adapters and a changed projector."""
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec

    root = tmp_path_factory.mktemp("merge")
    vlm = build_vlm(tiny_spec())
    vlm.save(root / "base")
    model = apply_trainable_parts(vlm, vlm.model, LearningRates(projector=1e-3, lora=1e-3),
                                  LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():   # lora_B starts at zero: give every trained tensor a visible change
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(root / "checkpoint-7")
    vlm.tokenizer.save_pretrained(root / "checkpoint-7")
    (root / "checkpoint-7" / "optimizer.pt").write_bytes(b"not a model file")
    return root, model.eval(), vlm


def sample_inputs(vlm) -> dict:
    ids = [vlm.image_token_id] * vlm.image_tokens_per_image + vlm.tokenizer("Is there a fracture?")["input_ids"]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.rand(1, 3, vlm.image_size, vlm.image_size, generator=torch.Generator().manual_seed(2))}


# Runs in a fresh interpreter where importing medtune or peft fails: only transformers may load the model.
LOAD_WITHOUT_MEDTUNE = """
import sys, json, torch
sys.modules["medtune"] = None
sys.modules["peft"] = None
from transformers import AutoModelForImageTextToText, AutoTokenizer
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
AutoTokenizer.from_pretrained(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(**inputs).logits, sys.argv[3])
"""


def test_merged_model_loads_without_medtune_or_peft_and_matches_the_adapter_logits(adapter_checkpoint, tmp_path):
    root, adapter_model, vlm = adapter_checkpoint
    out = merge_checkpoint(root / "checkpoint-7", tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in out.iterdir())   # no pickles travel along
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    inputs = sample_inputs(vlm)
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MEDTUNE, str(out), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True)
    merged_logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        adapter_logits = adapter_model(**inputs).logits
        with adapter_model.disable_adapter():   # the base without adapters: must differ
            base_logits = adapter_model(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)


def test_merge_refuses_an_existing_output_and_a_missing_base(adapter_checkpoint, tmp_path):
    root, _, _ = adapter_checkpoint
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        merge_checkpoint(root / "checkpoint-7", tmp_path / "exists")
    moved = tmp_path / "orphan"
    moved.mkdir()
    for path in (root / "checkpoint-7").iterdir():
        (moved / path.name).write_bytes(path.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="is not a local directory; pass --base"):
        merge_checkpoint(moved, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_checkpoint(moved, tmp_path / "out", base=root / "base")   # --base names it
    assert (tmp_path / "out" / "model.safetensors").is_file()
