"""Model kinds: the kind is chosen once (build or load) and every caller asks the object.

Properties: a checkpoint reloads as the kind it was saved as (an old medtune.json without a kind is composed);
parts cover every parameter; the labelled-positions loss equals the full forward's loss and gradients; sample
metadata a kind asks for survives encoding, the token cache, padding and packing, in sample order, and never
reaches the model's forward.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from medtune.data.jsonl import write_samples  # noqa: E402
from medtune.data.schema import ImageRef, Message, Metadata, Part, Sample  # noqa: E402
from medtune.models.build import build_vlm, load_vlm  # noqa: E402
from medtune.models.kinds import KINDS, kind_class  # noqa: E402
from medtune.models.kinds.base import MEDTUNE_FILE, Speedups  # noqa: E402
from medtune.models.presets import tiny_spec  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vlm():
    return build_vlm(tiny_spec())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(directory / name)
    return directory


def _sample(sample_id, question, answer, images=(), **meta):
    user = tuple(Part.of_image(ImageRef(i)) for i in images) + (Part.of_text(question),)
    return Sample(sample_id, [Message("user", user), Message("assistant", (Part.of_text(answer),))],
                  meta=Metadata(**meta))


SAMPLES = [
    _sample("ct-1", "Is there a mass?", "Yes, in the liver.", ["a.png"], modality="CT", organ="ABD"),
    _sample("text-1", "What is an effusion?", "Fluid in the pleural space.", modality=None, organ="CHEST"),
    _sample("mr-1", "Which sequence?", "T2.", ["b.png"], modality="MRI", organ="HEAD", extra={"site": "x"}),
    _sample("xr-1", "Both views normal?", "No.", ["a.png", "b.png"], modality="X-Ray", organ="CHEST"),
]


# ---- choosing the kind ------------------------------------------------------------------------------------


def test_a_saved_model_reloads_as_its_kind_and_an_old_checkpoint_is_composed(vlm, tmp_path):
    assert vlm.kind == "composed"
    vlm.save(tmp_path / "new")
    metadata = json.loads((tmp_path / "new" / MEDTUNE_FILE).read_text())
    assert metadata["kind"] == "composed"
    assert type(load_vlm(tmp_path / "new")) is type(vlm)
    # a checkpoint written before kinds were recorded has no "kind": it is a composed model
    vlm.save(tmp_path / "old")
    del metadata["kind"]
    (tmp_path / "old" / MEDTUNE_FILE).write_text(json.dumps(metadata))
    old = load_vlm(tmp_path / "old")
    assert old.kind == "composed" and old.image_tokens_per_image == vlm.image_tokens_per_image


def test_an_unknown_kind_is_a_clear_error(vlm, tmp_path):
    vlm.save(tmp_path)
    metadata = json.loads((tmp_path / MEDTUNE_FILE).read_text())
    (tmp_path / MEDTUNE_FILE).write_text(json.dumps({**metadata, "kind": "hologram"}))
    with pytest.raises(ValueError, match="unknown model kind 'hologram' \\(known: composed, native"):
        load_vlm(tmp_path)


def test_every_registered_kind_is_a_vlm_with_its_own_name():
    for name in KINDS:
        cls = kind_class(name)
        assert cls.kind == name and {"llm"} <= set(cls.parts)


def test_every_parameter_of_a_composed_model_has_a_part(vlm):
    parts = {vlm.part_of(name) for name, _ in vlm.model.named_parameters()}
    assert parts == set(vlm.parts)
    assert vlm.module_of("projector") == "model.multi_modal_projector"
    with pytest.raises(ValueError, match="belongs to no known part \\(vision, projector, llm\\) of a composed"):
        vlm.part_of("encoder.layers.0.weight")


# ---- the labelled-positions loss --------------------------------------------------------------------------


def _batch(vlm, root):
    encoded = [vlm.encode_sample(sample, root, max_length=256) for sample in SAMPLES]
    return vlm.collator()(encoded)


@pytest.mark.parametrize("num_items", [None, 37])
def test_the_labelled_positions_loss_equals_the_full_loss_and_gradients(vlm, root, num_items):
    assert vlm.exact_speedups().labelled_positions_head
    batch = _batch(vlm, root)
    model = vlm.model.train()
    results = {}
    for fast in (False, True):
        model.zero_grad()
        loss, _ = vlm.training_loss(model, batch, num_items, speedups=Speedups(labelled_positions_head=fast))
        loss.backward()
        # (the tower's last layer gets no gradient: LLaVA feeds the penultimate hidden state to the projector)
        results[fast] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None})
    model.eval()
    full, fast = results[False], results[True]
    torch.testing.assert_close(fast[0], full[0], rtol=1e-6, atol=1e-6)
    assert set(fast[1]) == set(full[1]) and any("multi_modal_projector" in name for name in full[1])
    for name, grad in full[1].items():
        torch.testing.assert_close(fast[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # and the full loss is the model's own
    with torch.no_grad():
        own = model(**{k: v for k, v in batch.items() if k not in ("sample_metadata", "sample_index")},
                    **({"num_items_in_batch": num_items} if num_items else {})).loss
    torch.testing.assert_close(full[0], own)


def test_the_head_runs_only_at_labelled_positions(vlm, root):
    batch = _batch(vlm, root)
    seen = []
    handle = vlm.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            vlm.training_loss(vlm.model, batch)
    finally:
        handle.remove()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert seen[0][0] == targets and seen[0][0] < batch["input_ids"].numel() / 4


# ---- sample metadata through encoding, the cache, padding and packing ------------------------------------


@pytest.fixture(scope="module")
def routed(vlm):
    """The tiny model asking for the modality, the organ and an extra key to be carried."""
    return dataclasses.replace(vlm, sample_metadata=("modality", "organ", "site"))


def _expected(sample):
    return {"modality": sample.meta.modality, "organ": sample.meta.organ, "site": sample.meta.extra.get("site")}


def test_metadata_survives_the_token_cache_padding_and_packing(routed, root, tmp_path):
    from medtune.train.cache import CachedDataset, encode_with_cache
    from medtune.models.packing import PackedDataset

    data = tmp_path / "train.jsonl"
    write_samples(data, SAMPLES)
    for attempt in ("cold", "warm"):
        encoded = encode_with_cache(lambda: ((s, root) for s in SAMPLES), routed, data_files=[data],
                                    cache_dir=tmp_path / "cache", max_length=256)
        assert encoded.from_cache == (attempt == "warm")
        rows = CachedDataset(encoded.rows, routed)
        assert [rows[i]["sample_metadata"] for i in range(len(rows))] == [_expected(s) for s in SAMPLES]
    padded = routed.collator()([rows[i] for i in range(len(rows))])
    assert padded["sample_metadata"] == [_expected(s) for s in SAMPLES]
    # sample_index says which sample each position holds: row r is sample r, padding and the blank image -1
    real = padded["attention_mask"].bool()
    assert torch.equal(padded["sample_index"], torch.where(real, torch.arange(len(SAMPLES))[:, None], -1))
    packed_rows = PackedDataset(rows, 200, lengths=rows.lengths)
    features = [packed_rows[i] for i in range(len(packed_rows))]
    packed = routed.collator(packing=True, max_length=200)(features)
    order = [i for row in packed_rows.rows for i in row]
    assert sorted(order) == list(range(len(SAMPLES))) and order != list(range(len(SAMPLES)))
    assert packed["sample_metadata"] == [_expected(SAMPLES[i]) for i in order]
    # in packed rows each sample's positions carry its place in that order; the padding tail carries -1
    for place, sample in enumerate(order):
        assert int((packed["sample_index"] == place).sum()) == rows.lengths[sample]
    assert int((packed["sample_index"] >= 0).sum()) == sum(rows.lengths)


def test_metadata_changes_the_cache_key_and_never_reaches_the_model(vlm, routed, root):
    from medtune.train.cache import cache_key

    assert cache_key([], vlm, max_length=256, truncation="text") != cache_key([], routed, max_length=256,
                                                                             truncation="text")
    batch = routed.collator()([routed.encode_sample(s, root, max_length=256) for s in SAMPLES])
    calls = []
    handle = routed.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(set(kwargs)),
                                                    with_kwargs=True)
    try:
        with torch.no_grad():
            with_metadata, _ = routed.training_loss(routed.model, batch)
            without, _ = vlm.training_loss(vlm.model, {k: v for k, v in batch.items()
                                                       if k not in ("sample_metadata", "sample_index")})
    finally:
        handle.remove()
    assert all(not {"sample_metadata", "sample_index"} & keys for keys in calls)
    assert torch.equal(with_metadata, without)


def test_a_model_without_metadata_carries_none(vlm, root):
    encoded = vlm.encode_sample(SAMPLES[0], root, max_length=256)
    batch = vlm.collator()([encoded])
    assert "sample_metadata" not in encoded and not {"sample_metadata", "sample_index"} & set(batch)


def test_a_frozen_tower_s_features_are_reused_with_the_same_loss_and_gradients(root):
    """Two batches over the same images: with the feature cache the tower runs once per distinct image, and the
    loss and every gradient equal those of the plain forward."""
    vlm = build_vlm(tiny_spec())
    model = vlm.model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(vlm.part_of(name) != "vision")
    speedups = vlm.exact_speedups()
    assert speedups.frozen_vision_features and not vlm.exact_speedups(distributed=True).frozen_vision_features
    batch = _batch(vlm, root)
    tower_calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, a, out: tower_calls.append(1))
    try:
        results = {}
        for reuse in (False, True):
            settings = dataclasses.replace(speedups, frozen_vision_features=reuse)
            tower_calls.clear()
            losses, grads = [], {}
            for _ in range(2):   # the second pass meets only images seen before
                model.zero_grad()
                loss, _ = vlm.training_loss(model, batch, speedups=settings)
                loss.backward()
                losses.append(loss.detach())
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[reuse] = (losses, grads, len(tower_calls))
    finally:
        handle.remove()
        model.eval()
    (plain_losses, plain_grads, plain_calls), (cached_losses, cached_grads, cached_calls) = results[False], results[True]
    assert plain_calls == 2 and cached_calls == 1
    torch.testing.assert_close(torch.stack(cached_losses), torch.stack(plain_losses), rtol=1e-6, atol=1e-6)
    assert cached_grads.keys() == plain_grads.keys() and any("projector" in n for n in cached_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # 4 images in the batch, 2 distinct (a.png and b.png, each twice): computed once each, reused 6 times
    assert (vlm._features.misses, vlm._features.hits) == (2, 6)


def test_a_training_tower_or_dropout_keeps_the_plain_forward():
    vlm = build_vlm(tiny_spec())
    assert not vlm.exact_speedups().frozen_vision_features   # built with every parameter trainable
    for parameter in vlm.model.parameters():
        parameter.requires_grad_(False)
    vlm.model.model.vision_tower.config.attention_dropout = 0.1
    assert not vlm.exact_speedups().frozen_vision_features
