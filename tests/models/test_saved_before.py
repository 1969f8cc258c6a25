"""Checkpoints an earlier medtune saved still load, as their kind, with the logits they had when saved.

The fixtures (tests/models/fixtures/saved_before/, see its README) were written by medtune before its MoE modules
moved into ``medtune.models.moe``; this test is what a move or rename of a model module must keep passing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from medtune.models.build import load_vlm  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "saved_before"


def test_an_moe_checkpoint_saved_before_the_moe_package_loads_with_its_logits():
    expected = load_file(str(FIXTURES / "moe-expected.safetensors"))
    vlm = load_vlm(FIXTURES / "moe")
    assert vlm.kind == "moe" and type(vlm.model).__module__ == "medtune.models.moe.model"
    assert vlm.settings.layers == [0] and vlm.settings.num_experts == 4
    with torch.no_grad():
        logits = vlm.model.eval()(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"],
                                  attention_mask=torch.ones_like(expected["input_ids"])).logits
    torch.testing.assert_close(logits[:, -5:], expected["logits"], rtol=0, atol=1e-6)
