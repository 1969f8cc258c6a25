"""Canonical sample -> tensors: labels, image-token expansion, truncation, pixels, parity with transformers."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.data.schema import ImageRef, Message, Part, Sample
from medtune.models.batch import IGNORE_INDEX
from medtune.models.kinds.native import NativeVLM
from medtune.models.processing import SkipSample
from medtune.models.templates import to_chat_messages


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny composed VLM (vicuna template), saved by medtune and loaded back from disk."""
    from medtune.models import presets
    from medtune.models.build import build_vlm, load_vlm

    directory = tmp_path_factory.mktemp("tiny")
    build_vlm(presets.tiny_spec()).save(directory)
    return load_vlm(directory), directory


@pytest.fixture(scope="module")
def vlm(saved):
    return saved[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, size in [("square.png", (32, 32)), ("wide.png", (48, 24)), ("other.png", (32, 32))]:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(directory / name)
    (directory / "broken.png").write_bytes(b"not a png")
    return directory


def _sample(*turns, sample_id="s1"):
    messages = [Message(role, tuple(Part.of_image(ImageRef(p[1:])) if p.startswith("@") else Part.of_text(p)
                                    for p in parts)) for role, parts in turns]
    return Sample(id=sample_id, messages=messages)


TWO_TURNS = _sample(("user", ["@square.png", "Is there a fracture?"]), ("assistant", ["No."]),
                    ("user", ["Compare", "@other.png"]), ("assistant", ["The same."]))


def test_labels_are_the_replies_and_images_are_expanded(vlm, root):
    encoded = vlm.encode_sample(TWO_TURNS, root, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels) == len(encoded["attention_mask"])
    assert ids.count(vlm.image_token_id) == 2 * vlm.image_tokens_per_image
    trained = [label for label in labels if label != IGNORE_INDEX]
    assert vlm.tokenizer.decode(trained) == " No.</s> The same.</s>"
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == vlm.image_token_id)
    assert encoded["pixel_values"].shape == (2, 3, vlm.image_size, vlm.image_size)


def test_matches_the_saved_llava_processor(saved, root):
    """Plain transformers (AutoProcessor of the saved checkpoint) builds the same ids and pixels."""
    from transformers import AutoProcessor

    vlm, directory = saved
    processor = AutoProcessor.from_pretrained(directory)
    messages = to_chat_messages(TWO_TURNS)
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.open(root / "square.png").convert("RGB"), Image.open(root / "other.png").convert("RGB")]
    reference = processor(text=text, images=images, return_tensors="pt")
    encoded = vlm.encode_sample(TWO_TURNS, root, max_length=512)
    assert encoded["input_ids"] == reference["input_ids"][0].tolist()
    assert torch.allclose(encoded["pixel_values"], reference["pixel_values"], atol=1e-6)


def test_prompt_matches_the_saved_processor_with_generation_prompt(saved, root):
    from transformers import AutoProcessor

    vlm, directory = saved
    processor = AutoProcessor.from_pretrained(directory)
    messages = to_chat_messages(TWO_TURNS)[:3]
    images = [Image.open(root / "square.png").convert("RGB"), Image.open(root / "other.png").convert("RGB")]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("ASSISTANT:")
    reference = processor(text=text, images=images, return_tensors="pt")
    prompt = vlm.encode_prompt(messages, images)
    assert torch.equal(prompt["input_ids"], reference["input_ids"])
    with pytest.raises(ValueError, match="2 image places but 1 images were given"):
        vlm.encode_prompt(messages, images[:1])


def test_plain_template_trains_on_the_caption_only(vlm, root):
    plain = dataclasses.replace(vlm, template="plain")
    sample = _sample(("user", ["@wide.png", "Describe the image."]), ("assistant", ["A chest radiograph."]))
    encoded = plain.encode_sample(sample, root, max_length=512)
    trained = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert vlm.tokenizer.decode(trained) == "A chest radiograph.\n"
    # BOS, the image tokens, then the caption: the question text is not in the input at all
    n = vlm.image_tokens_per_image
    assert encoded["input_ids"][:n + 1] == [vlm.tokenizer.bos_token_id] + [vlm.image_token_id] * n
    assert vlm.tokenizer.decode(encoded["input_ids"][n + 1:]) == "A chest radiograph.\n"


def test_truncation_cuts_text_only_or_skips(vlm, root):
    long_reply = " ".join(["the lesion is stable"] * 40)
    text_first = _sample(("user", ["Describe", "@square.png"]), ("assistant", [long_reply]))
    full = vlm.encode_tokens(text_first, max_length=10_000)
    limit = len(full["input_ids"]) - 100  # well past the image, well before the end of the reply
    cut = vlm.encode_tokens(text_first, max_length=limit)
    assert cut["input_ids"] == full["input_ids"][:limit] and cut["labels"] == full["labels"][:limit]
    assert cut["input_ids"].count(vlm.image_token_id) == vlm.image_tokens_per_image
    with pytest.raises(SkipSample) as dropped:
        vlm.encode_tokens(text_first, max_length=limit, truncation="drop")
    assert dropped.value.reason == "too long"
    first_image = full["input_ids"].index(vlm.image_token_id)
    with pytest.raises(SkipSample, match="would cut image tokens") as through_image:
        vlm.encode_tokens(text_first, max_length=first_image + 3)
    assert through_image.value.reason == "too long"
    first_label = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    with pytest.raises(SkipSample, match="nothing to train on"):
        vlm.encode_tokens(text_first, max_length=first_label)
    with pytest.raises(ValueError, match="truncation must be one of"):
        vlm.encode_tokens(text_first, max_length=limit, truncation="left")


def test_bad_samples_are_skipped_with_a_reason(vlm, root):
    cases = [
        (_sample(("user", ["@broken.png", "What?"]), ("assistant", ["x"])), "bad image", "broken.png"),
        (_sample(("user", ["@missing.png", "What?"]), ("assistant", ["x"])), "bad image", "missing.png"),
        (_sample(("user", ["@../outside.png", "What?"]), ("assistant", ["x"])), "bad image", "outside.png"),
        (_sample(("user", ["<image>\nWhat?"]), ("assistant", ["x"])), "image token in text", "1 image tokens"),
        (_sample(("user", ["@square.png", "What?"])), "no assistant reply", ""),
    ]
    for sample, reason, detail in cases:
        with pytest.raises(SkipSample) as caught:
            vlm.encode_sample(sample, root, max_length=512)
        assert caught.value.reason == reason and detail in str(caught.value)


def _striped(width, height):
    """Red left quarter, green middle, blue right quarter."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 4, 0] = 255
    pixels[:, width // 4: 3 * width // 4, 1] = 255
    pixels[:, 3 * width // 4:, 2] = 255
    return Image.fromarray(pixels)


def test_pad_mode_pads_with_the_mean_colour(vlm):
    values = dataclasses.replace(vlm, pad_mode="pad").pixel_values([_striped(64, 32)])[0]
    processor = vlm.image_processor
    std = torch.tensor(processor.image_std)
    # top and bottom quarter rows are padding: the mean colour normalises to ~0 (rounded to 8 bits)
    assert values[:, 0, :].abs().max() < 1 / 255 / std.min() + 1e-6
    assert values[:, -1, :].abs().max() < 1 / 255 / std.min() + 1e-6
    middle = values[:, vlm.image_size // 2, :]
    assert middle[0, 0] > 1 and middle[2, -1] > 1  # red at the left edge, blue at the right: nothing cut


def test_crop_mode_cuts_the_sides_and_resize_keeps_them(vlm):
    cropped = dataclasses.replace(vlm, pad_mode="crop").pixel_values([_striped(64, 32)])[0]
    resized = dataclasses.replace(vlm, pad_mode="resize").pixel_values([_striped(64, 32)])[0]
    row = vlm.image_size // 2
    assert cropped[0, row, 0] < 0 and cropped[2, row, -1] < 0  # red and blue quarters cut away
    assert resized[0, row, 0] > 1 and resized[2, row, -1] > 1  # squashed: all stripes kept
    assert not (resized[:, 0, :].abs() < 0.05).all()  # no padding rows


def test_native_path_gives_the_same_labels_as_the_template_path(vlm, root):
    """A Llava checkpoint used as a native VLM (processor renders and expands) labels the same tokens."""
    native = NativeVLM(model=vlm.model, tokenizer=vlm.tokenizer, processor=vlm.processor,
                       image_processor=vlm.image_processor, image_token=vlm.image_token,
                       image_token_id=vlm.image_token_id, image_size=vlm.image_size)
    composed = vlm.encode_sample(TWO_TURNS, root, max_length=512)
    through_processor = native.encode_sample(TWO_TURNS, root, max_length=512)
    assert through_processor["input_ids"] == composed["input_ids"]
    assert through_processor["labels"] == composed["labels"]
    assert torch.allclose(through_processor["pixel_values"], composed["pixel_values"], atol=1e-6)
