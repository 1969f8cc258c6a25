"""Projectors: output shapes, parameter counts, parity of mlp2x_gelu with transformers' LLaVA projector,
and the attention pool's fixed token count and indifference to patch order."""
import pytest

torch = pytest.importorskip("torch")

from medtune.models.projectors import (  # noqa: E402
    AttentionPoolProjector,
    build_projector,
)

VISION, LLM = 32, 48


def _features(batch=2, patches=16, seed=0):
    return torch.randn(batch, patches, VISION, generator=torch.Generator().manual_seed(seed))


def test_linear_maps_each_patch_to_llm_width():
    projector = build_projector("linear", VISION, LLM)
    features = _features()
    output = projector(features)
    assert output.shape == (2, 16, LLM)
    assert sum(p.numel() for p in projector.parameters()) == VISION * LLM + LLM
    # Patches are projected independently: changing one patch changes only its own output row.
    changed = features.clone()
    changed[:, 3] += 1.0
    difference = (projector(changed) - output).abs().sum(-1)
    assert difference[:, 3].gt(0).all() and difference[:, [0, 1, 2, 4]].eq(0).all()


def test_mlp2x_gelu_matches_transformers_llava_projector():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=VISION, num_attention_heads=4),
                         text_config=LlamaConfig(hidden_size=LLM, num_attention_heads=4))
    reference = LlavaMultiModalProjector(config)
    ours = build_projector("mlp2x_gelu", VISION, LLM)
    ours.load_state_dict(reference.state_dict(), strict=True)  # same parameter names and shapes
    features = _features()
    assert torch.equal(ours(features), reference(features))
    assert sum(p.numel() for p in ours.parameters()) == VISION * LLM + LLM + LLM * LLM + LLM


@pytest.mark.parametrize("patches", [16, 49])
def test_attention_pool_gives_one_token_per_query_whatever_the_patch_count(patches):
    projector = build_projector("attn_pool+mlp2x_gelu", VISION, LLM, num_queries=8, num_heads=4)
    assert projector(_features(patches=patches)).shape == (2, 8, LLM)


def test_attention_pool_default_has_128_queries_and_ignores_patch_order():
    projector = AttentionPoolProjector(VISION, LLM).eval()
    assert projector.num_queries == 128
    features = _features(batch=1, patches=16)
    shuffled = features[:, torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    # Cross-attention without positions pools a set: the patch order must not matter.
    torch.testing.assert_close(projector(shuffled), projector(features), rtol=0, atol=1e-5)


def test_attention_pool_trains_its_queries_and_norms():
    projector = build_projector("attn_pool+mlp2x_gelu", VISION, LLM, num_queries=4, num_heads=4)
    projector(_features()).pow(2).mean().backward()
    for name in ("queries", "query_norm.weight", "context_norm.weight", "output_norm.weight",
                 "attention.in_proj_weight", "mlp.linear_2.weight"):
        gradient = dict(projector.named_parameters())[name].grad
        assert gradient is not None and gradient.abs().sum() > 0, name


def test_bad_projector_settings_are_refused():
    with pytest.raises(ValueError, match="unknown projector 'mlp3x'"):
        build_projector("mlp3x", VISION, LLM)
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        build_projector("attn_pool+mlp2x_gelu", VISION, LLM, num_heads=5)
