"""Presets stay in their size classes and are reproducible: same seed, same weights."""
import pytest

torch = pytest.importorskip("torch")

from medtune.models.build import build_vlm  # noqa: E402
from medtune.models.presets import preset_spec, small_spec, tiny_spec  # noqa: E402


@pytest.mark.parametrize("make, low, high", [(tiny_spec, 1e5, 1e6), (small_spec, 1e6, 1e7)])
def test_preset_sizes(make, low, high):
    vlm = build_vlm(make())
    assert low <= vlm.num_parameters() < high
    assert vlm.tokenizer.chat_template  # the template travels with the tokenizer


def test_same_seed_same_weights_different_seed_different_weights():
    first, second = build_vlm(tiny_spec()), build_vlm(tiny_spec())
    other = build_vlm(tiny_spec(seed=1))
    for (name, a), b, c in zip(first.model.state_dict().items(), second.model.state_dict().values(),
                               other.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.model.parameters(), other.model.parameters()))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'huge'; presets: tiny, small"):
        preset_spec("huge")


@pytest.mark.parametrize("make", [tiny_spec, small_spec])
def test_a_mapping_override_updates_the_preset_tower_key_by_key(make):
    base, patched = make(), make(vision={"patch_size": 16})
    assert patched.vision == {**base.vision, "patch_size": 16}
    assert patched.llm == base.llm
    assert make(vision="openai/clip-vit-base-patch32").vision == "openai/clip-vit-base-patch32"   # a name replaces
