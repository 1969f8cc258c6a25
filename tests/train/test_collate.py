"""Pad-to-longest batches (right for training, left for generation) and the length-grouped sampler."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.data.schema import ImageRef, Message, Part, Sample
from medtune.models.batch import IGNORE_INDEX
from medtune.models.templates import to_chat_messages
from medtune.models.collate import PadCollator, collate_prompts, pad_batch
from medtune.models.packing import PackingCollator, pack_rows, plan_rows
from medtune.models.sampler import LengthGroupedSampler, padding_fraction


@pytest.fixture(scope="module")
def vlm():
    from medtune.models import presets
    from medtune.models.build import build_vlm

    vlm = build_vlm(presets.tiny_spec())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights: outputs depend visibly on every token (see test_packing)
        for parameter in vlm.model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return vlm


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / name)

    def sample(sample_id, question, answer, images):
        user = tuple(Part.of_image(ImageRef(i)) for i in images) + (Part.of_text(question),)
        return Sample(sample_id, [Message("user", user), Message("assistant", (Part.of_text(answer),))])

    return root, [sample("two", "Which is larger?", "The left one.", ["a.png", "b.png"]),
                  sample("none", "What is an effusion?", "Fluid in the pleural space, usually.", []),
                  sample("one", "Is it normal?", "Yes.", ["c.png"])]


def _loss_per_row(logits, labels):
    out = []
    for row_logits, row_labels in zip(logits, labels):
        targets = row_labels[1:]
        losses = torch.nn.functional.cross_entropy(row_logits[:-1], targets.clamp(min=0), reduction="none")
        out.append(losses[targets != IGNORE_INDEX].mean().item())
    return out


def test_right_padded_mixed_batch_gives_each_sample_its_own_loss(vlm, samples):
    root, items = samples
    encoded = [vlm.encode_sample(s, root, max_length=256) for s in items]
    batch = PadCollator(vlm.tokenizer.pad_token_id)(encoded)
    lengths = [len(e["input_ids"]) for e in encoded]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert torch.equal(batch["pixel_values"], torch.cat([encoded[0]["pixel_values"], encoded[2]["pixel_values"]]))
    assert (batch["labels"][1, lengths[1]:] == IGNORE_INDEX).all()
    with torch.no_grad():
        batched = _loss_per_row(vlm.model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                batch["labels"])
        alone = []
        for e in encoded:
            single = pad_batch([e], vlm.tokenizer.pad_token_id)
            alone += _loss_per_row(vlm.model(**{k: v for k, v in single.items() if k != "labels"}).logits,
                                   single["labels"])
    assert batched == pytest.approx(alone, abs=1e-4)


def test_a_batch_without_images_has_no_pixel_values(vlm, samples):
    root, items = samples
    batch = pad_batch([vlm.encode_sample(items[1], root, max_length=256)], vlm.tokenizer.pad_token_id)
    assert "pixel_values" not in batch


def test_left_padded_prompts_generate_what_each_prompt_generates_alone(vlm, samples):
    root, items = samples
    prompts = []
    for item in items:
        images = [Image.open(root / ref.path).convert("RGB") for ref in item.images]
        prompts.append(vlm.encode_prompt(to_chat_messages(item)[:1], images))
    batch = collate_prompts(prompts, vlm.tokenizer.pad_token_id, vlm.model)
    lengths = [p["input_ids"].shape[1] for p in prompts]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["attention_mask"][:, -1].all()  # every prompt ends in the last column
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=vlm.tokenizer.pad_token_id)
    with torch.no_grad():
        together = vlm.model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
        for row, prompt in enumerate(prompts):
            alone = vlm.model.generate(**{k: v for k, v in prompt.items() if v is not None}, **settings)
            assert together[row].tolist() == alone[0, prompt["input_ids"].shape[1]:].tolist()


def test_packing_collator_packs_single_samples_within_the_batch(vlm, samples):
    root, items = samples
    encoded = [vlm.encode_sample(s, root, max_length=256) for s in items]
    max_length = 240  # lengths are about 130, 100 and 110: two rows
    batch = PackingCollator(vlm.tokenizer.pad_token_id, max_length=max_length)(encoded)
    plan = plan_rows([len(e["input_ids"]) for e in encoded], max_length)
    expected = pack_rows([[encoded[i] for i in row] for row in plan], vlm.tokenizer.pad_token_id)
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[k], expected[k]) for k in batch if isinstance(batch[k], torch.Tensor))
    assert batch["input_ids"].shape[0] == len(plan) < len(encoded)
    with pytest.raises(ValueError, match="give max_length"):
        PackingCollator(vlm.tokenizer.pad_token_id)(encoded)


def test_length_grouped_sampler_is_deterministic_and_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_factor=16)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    assert order == list(LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_factor=16))
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i:i + 8] for i in range(0, 1000, 8)]
    assert lengths[batches[0][0]] == max(lengths)  # the largest batch first: out-of-memory shows at once
    shuffled = list(range(1000))
    random.Random(3).shuffle(shuffled)
    random_batches = [shuffled[i:i + 8] for i in range(0, 1000, 8)]
    assert padding_fraction(lengths, batches) < padding_fraction(lengths, random_batches) / 3


def test_a_resumed_run_sees_the_epoch_order_of_the_uninterrupted_run():
    """Why medtune keeps its own length-grouped sampler: a run resumed in epoch 2 builds a new sampler, and must
    see epoch 2's order. Ours derives the order from (seed, epoch); transformers' LengthGroupedSampler draws from a
    generator and has no set_epoch, so a rebuilt one starts again with epoch 1's order."""
    from transformers.trainer_pt_utils import LengthGroupedSampler as TransformersSampler

    lengths = [random.Random(1).randint(20, 400) for _ in range(200)]
    uninterrupted = LengthGroupedSampler(lengths, batch_size=4, seed=5)
    uninterrupted.set_epoch(0)
    list(uninterrupted)
    uninterrupted.set_epoch(1)
    resumed = LengthGroupedSampler(lengths, batch_size=4, seed=5)
    resumed.set_epoch(1)
    assert list(resumed) == list(uninterrupted)

    theirs = TransformersSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(5))
    first_epoch, second_epoch = list(theirs), list(theirs)
    rebuilt = TransformersSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(5))
    assert not hasattr(theirs, "set_epoch") and list(rebuilt) == first_epoch != second_epoch


@pytest.mark.parametrize("setting, factor", [("true", 50), ("4", 4)])
def test_group_by_length_reaches_the_trainer_s_sampler(setting, factor, tmp_path):
    """A stage's ``group_by_length`` (true: 50 batches per mega-batch, N: N) is the sampler the Trainer draws from;
    false draws at random (Trainer's own sampler)."""
    from types import SimpleNamespace

    from medtune.paths import recipe_path
    from medtune.train.recipe import load_recipe
    from medtune.train.run import training_arguments
    from medtune.train.trainer import MedtuneTrainer

    def arguments(value):
        recipe = load_recipe(recipe_path("demo"), [f"stages.1.group_by_length={value}"])
        return training_arguments(recipe, recipe.stages[1], tmp_path, None)

    assert arguments("false").train_sampling_strategy == "random"
    args = arguments(setting)
    assert args.train_sampling_strategy == "group_by_length" and args.length_group_batches == factor
    lengths = [random.Random(2).randint(20, 400) for _ in range(256)]
    built = MedtuneTrainer._get_train_sampler(SimpleNamespace(args=args, train_dataset=SimpleNamespace(lengths=lengths)))
    expected = LengthGroupedSampler(lengths, batch_size=args.train_batch_size, seed=args.seed, mega_batch_factor=factor)
    assert list(built) == list(expected)
