"""MedMax-style training of a discrete-token model through the real CLI: a tiny Chameleon with LoRA on bundled
VQA-RAD (images become VQ codes), merged with the adapter's own r and alpha (MedMax's merge hard-codes 16/16)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from medtune.cli import main


@pytest.mark.slow
def test_lora_on_a_discrete_token_model_trains_and_merges_to_the_adapter_model(tmp_path):
    from peft import PeftModel

    from medtune.models.build import load_vlm
    from medtune.models.chameleon import MedtuneChameleonForConditionalGeneration

    recipe = {"model": {"preset": "tiny-chameleon"}, "output_dir": str(tmp_path / "run"),
              "cache_dir": str(tmp_path / "cache"), "report_to": ["none"],
              "stages": [{"name": "sft", "max_steps": 3, "batch_size": 2, "max_length": 256, "lr": {"lora": 5e-3},
                          "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 12,
                                   "labels": "first_separator"},
                          # r and alpha of their own: a merge that assumed MedMax's 16/16 would scale them wrongly
                          "lora": {"r": 4, "alpha": 2, "dropout": 0.05, "target_modules": ["q_proj", "down_proj"]}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    stage = tmp_path / "run" / "stage-0-sft"
    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 2)
    merged = load_vlm(stage / "model")
    assert merged.kind == "discrete" and merged.label_rule == "first_separator"
    base = MedtuneChameleonForConditionalGeneration.from_pretrained(stage / "base-model")
    before = dict(base.named_parameters())
    changed = {n for n, p in merged.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("q_proj.weight", "down_proj.weight")) for n in changed)
    adapted = PeftModel.from_pretrained(base, stage / "adapter").eval()
    ids = torch.randint(5, len(merged.tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.model.eval()(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
