"""Packing keeps samples apart: the per-sample loss of a packed batch equals the unpacked loss."""
import pytest
import torch

from medtune.data.schema import ImageRef, Message, Part, Sample
from medtune.models.batch import IGNORE_INDEX
from medtune.models.packing import PackedDataset, pack_rows, plan_rows, sample_spans


@pytest.fixture(scope="module")
def vlm():
    from medtune.models import presets
    from medtune.models.build import build_vlm

    vlm = build_vlm(presets.tiny_spec())
    # Larger random weights than the default init make losses depend visibly on every input token and image,
    # so a leak across samples or a misplaced image shows up far above the 1e-4 tolerance.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in vlm.model.named_parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return vlm


def _image(directory, name, seed, size):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / name)
    return ImageRef(name)


def _sample(sample_id, turns):
    messages = []
    for role, parts in turns:
        messages.append(Message(role, tuple(Part.of_image(p) if isinstance(p, ImageRef) else Part.of_text(p)
                                            for p in parts)))
    return Sample(id=sample_id, messages=messages)


@pytest.fixture(scope="module")
def encoded(vlm, tmp_path_factory):
    """Four samples: one image, text only, two images, one image over two turns; encoded for training."""
    root = tmp_path_factory.mktemp("images")
    a, b, c, d = (_image(root, f"{n}.png", seed, size) for n, seed, size in
                  [("a", 1, (40, 30)), ("b", 2, (32, 32)), ("c", 3, (20, 50)), ("d", 4, (64, 48))])
    samples = [
        _sample("one-image", [("user", [a, "Is there a fracture?"]), ("assistant", ["No."])]),
        _sample("text-only", [("user", ["What is a pleural effusion?"]),
                              ("assistant", ["Fluid in the pleural space."])]),
        _sample("two-images", [("user", ["Compare", b, "with", c]), ("assistant", ["The lesion grew."])]),
        _sample("two-turns", [("user", [d, "What organ?"]), ("assistant", ["Brain."]),
                              ("user", ["Is it normal?"]), ("assistant", ["Yes, it is normal."])]),
    ]
    return [vlm.encode_sample(s, root, max_length=256) for s in samples]


def _token_losses(logits, labels):
    """Per-position next-token cross-entropy of one sequence ([L, V] logits, [L] labels) and its mask."""
    targets = labels[1:]
    losses = torch.nn.functional.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return losses, targets != IGNORE_INDEX


def _unpacked_losses(model, examples):
    out = []
    for example in examples:
        batch = {"input_ids": torch.tensor([example["input_ids"]]), "attention_mask": torch.ones(1, len(example["input_ids"]), dtype=torch.long)}
        if example["pixel_values"] is not None:
            batch["pixel_values"] = example["pixel_values"]
        with torch.no_grad():
            logits = model(**batch).logits[0]
        losses, mask = _token_losses(logits, torch.tensor(example["labels"]))
        out.append(losses[mask].mean().item())
    return out


def _packed_losses(model, batch, rows):
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    per_sample = {}
    for r, row in enumerate(rows):
        spans = sample_spans(batch["position_ids"][r])[:len(row)]
        for sample_index, (start, end) in zip(row, spans):
            losses, mask = _token_losses(logits[r, start:end], batch["labels"][r, start:end])
            per_sample[sample_index] = losses[mask].mean().item()
    return per_sample


@pytest.mark.parametrize("attention,implementation", [("position_ids", "sdpa"), ("position_ids", "eager"),
                                                      ("mask", "eager"), ("mask", "sdpa"), ("flatten", "sdpa")])
def test_packed_loss_equals_unpacked(vlm, encoded, attention, implementation):
    vlm.model.set_attn_implementation(implementation)
    lengths = [len(e["input_ids"]) for e in encoded]
    max_length = sorted(lengths)[-1] + sorted(lengths)[-2]  # forces rows of several samples, reordered
    rows = plan_rows(lengths, max_length)
    assert any(len(row) > 1 for row in rows)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3]
    batch = pack_rows([[encoded[i] for i in row] for row in rows], vlm.tokenizer.pad_token_id, attention=attention)
    # pixel values follow the order of images in the packed rows, not the order of the input samples
    images_in_row_order = [e["pixel_values"] for row in rows for e in (encoded[i] for i in row)
                           if e["pixel_values"] is not None]
    assert torch.equal(batch["pixel_values"], torch.cat(images_in_row_order))
    unpacked = _unpacked_losses(vlm.model, encoded)
    packed = _packed_losses(vlm.model, batch, rows if attention != "flatten" else [sum(rows, [])])
    for index, loss in enumerate(unpacked):
        assert packed[index] == pytest.approx(loss, abs=1e-4), f"sample {index} ({attention}, {implementation})"


def test_model_loss_on_packed_batch_is_the_token_mean_of_unpacked(vlm, encoded):
    """The model's own loss (labels shifted inside) ignores predictions across sample boundaries."""
    vlm.model.set_attn_implementation("sdpa")
    rows = [[0, 1], [2, 3]]
    batch = pack_rows([[encoded[i] for i in row] for row in rows], vlm.tokenizer.pad_token_id)
    with torch.no_grad():
        packed_loss = vlm.model(**batch).loss.item()
    total, count = 0.0, 0
    for example in encoded:
        with torch.no_grad():
            logits = vlm.model(input_ids=torch.tensor([example["input_ids"]]),
                               pixel_values=example["pixel_values"]).logits[0]
        losses, mask = _token_losses(logits, torch.tensor(example["labels"]))
        total, count = total + losses[mask].sum().item(), count + int(mask.sum())
    assert packed_loss == pytest.approx(total / count, abs=1e-4)


def test_crossing_attention_would_change_the_loss(vlm, encoded):
    """Control: without position restarts and separation, the second sample's loss differs."""
    vlm.model.set_attn_implementation("sdpa")
    batch = pack_rows([[encoded[1], encoded[0]]], vlm.tokenizer.pad_token_id)
    naive = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        logits = vlm.model(**naive).logits[0]
    start = len(encoded[1]["input_ids"])
    losses, mask = _token_losses(logits[start:], batch["labels"][0, start:])
    assert abs(losses[mask].mean().item() - _unpacked_losses(vlm.model, [encoded[0]])[0]) > 1e-3


def test_plan_rows_fills_rows_and_respects_the_limit():
    lengths = [70, 60, 50, 30, 8, 90, 10]
    rows = plan_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 4  # 318 tokens need at least 4 rows of 100
    assert plan_rows(lengths, 100, "greedy") == [[0], [1], [2, 3, 4], [5, 6]]  # data order kept
    with pytest.raises(ValueError, match="sample 5 has 90 tokens > max_length 80"):
        plan_rows(lengths, 80)


def test_packed_dataset_rows_hold_the_samples(encoded):
    dataset = PackedDataset(encoded, max_length=400)
    assert sum(len(row) for row in dataset) == len(encoded)
    assert all(sum(len(s["input_ids"]) for s in row) <= 400 for row in dataset)


def test_pixel_values_in_the_wrong_order_change_the_loss(vlm, encoded):
    """Control for the order check above: swapping two images of a packed batch changes their samples' loss."""
    vlm.model.set_attn_implementation("sdpa")
    rows = [[2, 0]]
    batch = pack_rows([[encoded[i] for i in row] for row in rows], vlm.tokenizer.pad_token_id)
    right = _packed_losses(vlm.model, batch, rows)
    batch["pixel_values"] = batch["pixel_values"][[2, 1, 0]]  # sample 2's first image <-> sample 0's image
    wrong = _packed_losses(vlm.model, batch, rows)
    assert abs(right[0] - wrong[0]) > 1e-3 and abs(right[2] - wrong[2]) > 1e-3


def test_flatten_mode_matches_transformers_data_collator_with_flattening(vlm, encoded):
    """Token side of "flatten" is exactly what DataCollatorWithFlattening gives flash-attention varlen kernels."""
    from transformers import DataCollatorWithFlattening
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rows = [[encoded[2], encoded[0]], [encoded[1]]]
    ours = pack_rows(rows, vlm.tokenizer.pad_token_id, attention="flatten")
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for row in rows for e in row])
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["max_length_q"] == theirs["max_length_q"]
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(ours["position_ids"])
    assert cu_q.tolist() == ours["cu_seq_lens_q"].tolist() and int(max_q) == ours["max_length_q"]


def test_mask_mode_is_block_diagonal_and_causal():
    from medtune.models.packing import block_causal_mask

    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]
    assert mask.min().item() == torch.finfo(torch.float32).min
