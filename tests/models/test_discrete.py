"""The discrete-token kind on a tiny random Chameleon: token layout, labels, the lifted image-logit mask, the
Hugging Face checkpoint round trip, text generation without image codes, and Chameleon's original format."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from medtune.data.schema import ImageRef, Message, Metadata, Part, Sample  # noqa: E402
from medtune.models.batch import IGNORE_INDEX  # noqa: E402
from medtune.models.build import load_vlm  # noqa: E402
from medtune.models.generation import ImageSampling  # noqa: E402
from medtune.models.presets import tiny_chameleon  # noqa: E402
from medtune.models.processing import SkipSample  # noqa: E402
from plain_python import run_without_medtune  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vlm():
    return tiny_chameleon()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 32)), ("b.png", (32, 48))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(directory / name)
    return directory


def _turn(role, *parts):
    return Message(role, tuple(Part.of_image(ImageRef(p[1:])) if p.startswith("@") else Part.of_text(p)
                               for p in parts))


TWO_IMAGES = Sample("two", [_turn("user", "@a.png", "Compare with", "@b.png"), _turn("assistant", "The same.")])
# an assistant that answers with an image (MedMax's generation tasks): its codes are labels
DRAWN = Sample("drawn", [_turn("user", "Draw a chest X-ray."), _turn("assistant", "Here:", "@a.png"),
                         _turn("user", "Thanks, is it normal?"), _turn("assistant", "Yes.")])


def test_two_images_become_begin_codes_end_blocks_and_only_replies_train(vlm, root):
    encoded = vlm.encode_sample(TWO_IMAGES, root, max_length=1024)
    ids, labels = encoded["input_ids"], encoded["labels"]
    boi, eoi = vlm.token_id(vlm.boi_token), vlm.token_id(vlm.eoi_token)
    n = vlm.image_tokenizer.codes_per_image
    assert ids[0] == vlm.tokenizer.bos_token_id and ids[-1] == vlm.tokenizer.eos_token_id
    starts = [i for i, t in enumerate(ids) if t == boi]
    assert len(starts) == 2 and all(ids[s + n + 1] == eoi for s in starts)
    codes = set(vlm.image_token_ids)
    for start in starts:
        assert set(ids[start + 1:start + 1 + n]) <= codes
    assert sum(t in codes for t in ids) == 2 * n and vlm.image_token_id not in ids
    # the user turn (with both images) is masked; exactly the reply and its EOS train
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert vlm.tokenizer.decode(trained) == "The same." + vlm.tokenizer.eos_token
    assert [label for t, label in zip(ids, labels) if label != IGNORE_INDEX] == trained
    # the codes are the VQ's own, offset by the model's vocabulary map
    images = [Image.open(root / name).convert("RGB") for name in ("a.png", "b.png")]
    expected = vlm.image_tokenizer.codes_to_token_ids(vlm.image_tokenizer.encode(images)).tolist()
    assert [ids[s + 1:s + 1 + n] for s in starts] == expected


def test_an_image_in_a_reply_trains_and_every_reply_of_every_turn_trains(vlm, root):
    encoded = vlm.encode_sample(DRAWN, root, max_length=1024)
    ids, labels = encoded["input_ids"], encoded["labels"]
    codes = set(vlm.image_token_ids)
    assert all(label == t for t, label in zip(ids, labels) if t in codes)
    trained_text = vlm.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX and t not in codes
                                         and t not in (vlm.token_id(vlm.boi_token), vlm.token_id(vlm.eoi_token))])
    eos = vlm.tokenizer.eos_token
    assert trained_text == f"Here:\n{eos}Yes.{eos}"


def test_medmax_rule_trains_everything_after_the_first_separator(vlm, root):
    import dataclasses

    medmax = dataclasses.replace(vlm, label_rule="first_separator")
    ids, labels = (medmax.encode_sample(DRAWN, root, max_length=1024)[k] for k in ("input_ids", "labels"))
    separator = vlm.token_id(vlm.end_of_turn_token)
    cut = ids.index(separator) + 1
    assert all(label == IGNORE_INDEX for label in labels[:cut]) and labels[cut:] == ids[cut:]
    # the second user turn trains too under MedMax's rule (it masks only up to the first separator)
    assert ids.count(separator) == 2 and labels[ids.index(separator, cut)] == separator
    alone = Sample("no-sep", [_turn("assistant", "An answer without a question.")])
    with pytest.raises(SkipSample, match="no end-of-turn separator"):
        medmax.encode_sample(alone, root, max_length=1024)


def test_carried_codes_are_used_without_the_encoder_and_checked(vlm, root, monkeypatch):
    images = [Image.open(root / name).convert("RGB") for name in ("a.png", "b.png")]
    codes = vlm.image_tokenizer.encode(images).tolist()
    carried = Sample("two", TWO_IMAGES.messages, meta=Metadata(extra={"image_tokens": codes}))
    reference = vlm.encode_sample(TWO_IMAGES, root, max_length=1024)
    monkeypatch.setattr(vlm.image_tokenizer, "encode", lambda images: pytest.fail("the VQ encoder ran"))
    assert vlm.encode_sample(carried, None, max_length=1024) == reference
    bad = Sample("bad", TWO_IMAGES.messages, meta=Metadata(extra={"image_tokens": [codes[0], [9999] * len(codes[0])]}))
    with pytest.raises(SkipSample, match="out of range"):
        vlm.encode_sample(bad, None, max_length=1024)
    short = Sample("short", TWO_IMAGES.messages, meta=Metadata(extra={"image_tokens": [codes[0]]}))
    with pytest.raises(SkipSample, match="image codes do not fit"):
        vlm.encode_sample(short, None, max_length=1024)


def test_truncation_never_cuts_an_image_block(vlm, root):
    full = vlm.encode_sample(DRAWN, root, max_length=1024)["input_ids"]
    start = full.index(vlm.token_id(vlm.boi_token))
    with pytest.raises(SkipSample, match="would cut an image"):
        vlm.encode_sample(DRAWN, root, max_length=start + 5)
    after = start + vlm.image_tokenizer.codes_per_image + 2
    cut = vlm.encode_sample(DRAWN, root, max_length=after + 2)
    assert cut["input_ids"] == full[:after + 2]


def _batch(vlm, root, samples):
    return vlm.collator()([vlm.encode_sample(s, root, max_length=1024) for s in samples])


def test_the_loss_over_image_codes_is_the_unmasked_cross_entropy(vlm, root):
    from transformers import ChameleonForConditionalGeneration

    batch = _batch(vlm, root, [DRAWN, TWO_IMAGES])
    with torch.no_grad():
        loss, _ = vlm.training_loss(vlm.model, batch)
        hidden = vlm.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        logits = vlm.model.lm_head(hidden).float()
    targets = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                  ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert bool(torch.isin(targets, torch.tensor(vlm.image_token_ids)).any())
    # transformers' own class masks image logits: the same labels give a loss of another order of magnitude
    stock = ChameleonForConditionalGeneration(vlm.model.config)
    stock.load_state_dict(vlm.model.state_dict())
    with torch.no_grad():
        masked = stock.eval()(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert masked > 1e6 * loss


def test_the_checkpoint_is_a_chameleon_checkpoint_and_reloads_as_the_discrete_kind(vlm, root, tmp_path):
    from transformers import AutoModelForImageTextToText

    vlm.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "chameleon"
    assert json.loads((tmp_path / "medtune.json").read_text())["kind"] == "discrete"
    loaded = load_vlm(tmp_path)
    assert loaded.kind == "discrete" and loaded.template == "chameleon"
    batch = _batch(vlm, root, [TWO_IMAGES])
    with torch.no_grad():
        ours = vlm.model(input_ids=batch["input_ids"]).logits
        assert torch.equal(loaded.model(input_ids=batch["input_ids"]).logits, ours)
        plain = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()(input_ids=batch["input_ids"]).logits
    text = torch.ones(ours.shape[-1], dtype=torch.bool)
    text[vlm.image_token_ids] = False
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)).__name__ == "ChameleonForConditionalGeneration"
    assert torch.equal(plain[..., text], ours[..., text])   # the same model; transformers masks image codes
    assert bool((plain[..., ~text] == torch.finfo(plain.dtype).min).all())
    # a Chameleon checkpoint medtune did not write (no medtune.json) is still the discrete kind
    (tmp_path / "medtune.json").unlink()
    assert load_vlm(tmp_path).kind == "discrete"


def test_text_generation_never_emits_image_codes_and_batches_like_one_by_one(vlm):
    from medtune.models.generation import GenerationSettings, Generator

    generator = Generator(vlm)
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                     for q in ("Is it normal?", "Which organ is shown here?")]
    images = [[Image.new("RGB", (40, 30), "gray")], [Image.new("RGB", (30, 30), "white")]]
    settings = GenerationSettings(max_new_tokens=12)
    batch = generator._encode_batch(conversations, images)
    with torch.inference_mode():
        output = generator._run_generate(batch, settings)
    new = output[:, batch["input_ids"].shape[1]:]
    assert not bool(torch.isin(new, torch.tensor(vlm.image_token_ids)).any())
    together = generator.generate(conversations, images, settings)
    assert together == [generator.generate([c], [i], settings)[0] for c, i in zip(conversations, images)]


def test_every_parameter_is_vision_or_llm(vlm):
    parts = {name: vlm.part_of(name) for name, _ in vlm.model.named_parameters()}
    assert set(parts.values()) == {"vision", "llm"}
    assert all(("vqmodel" in name) == (part == "vision") for name, part in parts.items())


def test_a_discrete_model_holds_experts_too_and_reloads_with_identical_logits(root, tmp_path):
    """The experts component on the discrete kind: parts, the record in medtune.json, identical logits after a
    reload (the MoE blocks are rebuilt before the weights are read)."""
    from medtune.models.moe.settings import MoESettings

    moe = tiny_chameleon().with_experts(MoESettings.preset("med-moe", layers=[0]))
    parts = {moe.part_of(name) for name, _ in moe.model.named_parameters()}
    assert moe.kind == "discrete" and parts == {"vision", "llm", "ffn", "experts", "router"}
    moe.save(tmp_path)
    assert json.loads((tmp_path / "medtune.json").read_text())["experts"]["layers"] == [0]
    loaded = load_vlm(tmp_path)
    assert loaded.kind == "discrete" and loaded.experts.settings == moe.experts.settings
    ids = _batch(moe, root, [TWO_IMAGES])["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, moe.model(input_ids=ids).logits)


def test_chameleon_format_round_trip_gives_identical_weights(vlm, tmp_path):
    from medtune.models.chameleon import from_chameleon_format, to_chameleon_format

    to_chameleon_format(vlm.model, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())["model"]
    assert params["n_layers"] == vlm.model.config.num_hidden_layers and params["qk_normalization"] is True
    saved = torch.load(tmp_path / "consolidated.pth", weights_only=True)
    assert "tok_embeddings.weight" in saved and "layers.0.attention.wq.weight" in saved
    assert not any("vqmodel" in key for key in saved)
    back = from_chameleon_format(tmp_path, vlm.model.config)
    original = {k: v for k, v in vlm.model.state_dict().items() if "vqmodel" not in k}
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    # the q projection really is stored in Chameleon's interleaved order, not as a copy
    assert not torch.equal(saved["layers.0.attention.wq.weight"], original["model.layers.0.self_attn.q_proj.weight"])


def test_per_head_norms_that_differ_are_refused_by_the_export(vlm, tmp_path):
    import copy

    from medtune.errors import UserError
    from medtune.models.chameleon import to_chameleon_format

    model = copy.deepcopy(vlm.model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_norm.weight[1] += 0.5
    with pytest.raises(UserError, match="q/k layer norms differ"):
        to_chameleon_format(model, tmp_path)


def test_the_export_verb_writes_chameleon_s_format_and_refuses_other_kinds(vlm, tmp_path, capsys):
    from medtune.cli import main
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec

    vlm.save(tmp_path / "chameleon")
    assert main(["model", "export-chameleon", str(tmp_path / "chameleon"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "consolidated.pth").is_file() and (tmp_path / "out" / "params.json").is_file()
    build_vlm(tiny_spec()).save(tmp_path / "composed")
    assert main(["model", "export-chameleon", str(tmp_path / "composed"), str(tmp_path / "no")]) == 2
    assert "a composed model has no original format" in capsys.readouterr().err


@pytest.fixture(scope="module")
def drawing(tmp_path_factory):
    """The tiny Chameleon with a (random) pixel decoder of its VQ's shape attached, saved and reloaded."""
    from medtune.models.vqgan import ChameleonVQGANDecoder, ChameleonVQGANDecoderConfig

    vlm = tiny_chameleon()
    torch.manual_seed(0)
    vlm.attach_decoder(ChameleonVQGANDecoder(ChameleonVQGANDecoderConfig.from_transformers(vlm.model.config)))
    directory = tmp_path_factory.mktemp("drawing")
    vlm.save(directory)
    return load_vlm(directory)


def test_an_image_answer_is_one_decoded_image_of_the_vq_s_size(drawing):
    from medtune.models.generation import GenerationSettings, Generator

    generator = Generator(drawing)
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Draw a chest X-ray."}]}]
    settings = GenerationSettings(max_new_tokens=drawing.image_tokenizer.codes_per_image + 8, modalities=("image",),
                                  image=ImageSampling(temperature=0))
    batch = generator._encode_batch([conversation], [[]])
    with torch.inference_mode():
        output = generator._run_generate(batch, settings)[0, batch["input_ids"].shape[1]:].tolist()
    boi, eoi = drawing.token_id(drawing.boi_token), drawing.token_id(drawing.eoi_token)
    n = drawing.image_tokenizer.codes_per_image
    assert output[0] == boi and output[n + 1] == eoi and set(output[1:n + 1]) <= set(drawing.image_token_ids)
    completion = generator.complete([conversation], [[]], settings)[0]
    assert len(completion.images) == 1 and completion.images[0].size == (32, 32)
    assert completion.images[0].mode == "RGB" and completion.finish_reason == "stop"
    # deterministic: greedy decoding and a deterministic decoder give the same pixels again
    again = generator.complete([conversation], [[]], settings)[0].images[0]
    assert np.array_equal(np.asarray(again), np.asarray(completion.images[0]))


def _guided_codes_by_hand(vlm, prompt: list[int], n: int, scales: tuple[float, float]) -> list[int]:
    """Greedy guided codes from whole-sequence forwards (no cache), streams built from Chameleon's rule."""
    bos, boi, eoi = vlm.tokenizer.bos_token_id, vlm.token_id(vlm.boi_token), vlm.token_id(vlm.eoi_token)
    image_ids = torch.tensor(vlm.image_token_ids)
    kept = {bos, boi, eoi, *vlm.image_token_ids}

    def last_logits(ids):
        with torch.no_grad():
            return vlm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()

    full = prompt + [boi]
    image_only, none = [t for t in full if t in kept], [bos, boi]
    codes = []
    for _ in range(n):
        f, i, u = (last_logits(ids + codes) for ids in (full, image_only, none))
        mixed = u + scales[1] * (i - u) + scales[0] * (f - i)
        codes.append(int(image_ids[mixed[image_ids].argmax()]))
    return codes


@pytest.mark.parametrize("with_image", [False, True])
def test_image_codes_are_chameleon_s_guided_logits_step_by_step(drawing, root, with_image):
    """Guidance over three streams (full prompt; its BOS and image tokens only; BOS + begin-of-image), mixed as
    Chameleon's InBatchInstructCFGLogitsProcessor mixes them, equals a hand computation at every code; with both
    scales 1 it is the unguided argmax, and the default scales change the picture."""
    from medtune.models.generation import GenerationSettings, Generator

    generator, n = Generator(drawing), drawing.image_tokenizer.codes_per_image
    content = [{"type": "text", "text": "Draw the same lung, larger."}]
    images = [Image.open(root / "a.png").convert("RGB")] if with_image else []
    if with_image:
        content.insert(0, {"type": "image"})
    batch = generator._encode_batch([[{"role": "user", "content": content}]], [images])
    prompt = batch["input_ids"][0].tolist()

    def generated(guidance_text, guidance_image):
        settings = GenerationSettings(max_new_tokens=n + 4, modalities=("image",), image=ImageSampling(
            guidance_text=guidance_text, guidance_image=guidance_image, temperature=0))
        with torch.inference_mode():
            out = generator._run_generate(batch, settings)[0, len(prompt):].tolist()
        assert out[0] == drawing.token_id(drawing.boi_token) and out[n + 1] == drawing.token_id(drawing.eoi_token)
        return out[1:n + 1]

    guided = generated(3.0, 1.2)
    assert guided == _guided_codes_by_hand(drawing, prompt, n, (3.0, 1.2))
    plain = generated(1.0, 1.0)
    assert plain == _guided_codes_by_hand(drawing, prompt, n, (1.0, 1.0))
    assert plain != guided


def test_a_batch_of_image_answers_is_guided_row_by_row_like_single_prompts(drawing):
    """Left padding does not reach the streams: each row's codes equal that prompt's codes generated alone."""
    from medtune.models.generation import GenerationSettings, Generator

    generator, n = Generator(drawing), drawing.image_tokenizer.codes_per_image
    conversations = [[{"role": "user", "content": [{"type": "text", "text": text}]}]
                     for text in ("Draw a chest X-ray.", "Draw a much longer and more detailed abdominal CT slice.")]
    settings = GenerationSettings(max_new_tokens=n + 4, modalities=("image",), image=ImageSampling(temperature=0))
    together = generator.complete(conversations, [[], []], settings)
    alone = [generator.complete([c], [[]], settings)[0] for c in conversations]
    for a, b in zip(together, alone):
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(together[0].images[0]), np.asarray(together[1].images[0]))


def test_the_streams_find_each_prompt_after_its_left_padding_even_when_pad_is_bos():
    from medtune.models.generation import ImageSampling
    from medtune.models.image_guidance import GuidanceStreams

    def starts(pad, bos, rows):
        streams = GuidanceStreams(None, bos=bos, boi=5, eoi=6, image_ids=[10, 11], pad=pad, sampling=ImageSampling())
        streams.note_prompt(torch.tensor(rows))
        return streams.prompt_starts

    assert starts(pad=2, bos=1, rows=[[2, 2, 1, 7], [1, 7, 8, 9]]) == [2, 0]
    assert starts(pad=0, bos=0, rows=[[0, 0, 0, 7], [0, 7, 8, 9]]) == [2, 0]   # the last leading 0 is the BOS


def test_a_row_that_ends_inside_an_image_stops_its_guidance_streams():
    """A finished, cancelled or stopped row gets padding: its streams close and are not run again."""
    from medtune.models.generation import ImageSampling
    from medtune.models.kinds.discrete import ImageBlockLogitsProcessor

    class Streams:
        def __init__(self):
            self.guided, self.closed = [], []

        def note_prompt(self, input_ids):
            pass

        def guide(self, row, input_ids, full, codes):
            self.guided.append((row, codes))
            return full

        def close(self, row):
            self.closed.append(row)

    codes, boi, eoi, eos, pad = [10, 11, 12], 5, 6, 2, 2
    streams = Streams()
    processor = ImageBlockLogitsProcessor(codes, boi, eoi, 3, eos, ("image",), sampling=ImageSampling(temperature=0),
                                          streams=streams)
    rows = [[1, 7, 8], [1, 7, 8]]
    for step in ([boi, boi], [10, 10], [pad, 11]):   # row 0 is cancelled after one code; row 1 goes on
        processor(torch.tensor(rows), torch.zeros(2, 16))
        rows = [r + [t] for r, t in zip(rows, step)]
    processor(torch.tensor(rows), torch.zeros(2, 16))
    assert streams.closed == [0]
    assert streams.guided == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]


def test_image_codes_are_drawn_with_their_own_temperature_and_top_p():
    """The draw follows softmax(logits / temperature) within the top-p nucleus (transformers' warpers, as
    Chameleon chains them): frequencies over many draws match the hand-computed distribution."""
    from medtune.models.generation import ImageSampling
    from medtune.models.image_guidance import pick_code

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    sampling = ImageSampling(temperature=0.7, top_p=0.9)
    probs = torch.softmax(logits / 0.7, dim=0)
    keep = torch.cumsum(probs, 0) - probs < 0.9     # logits are sorted: a code stays while the mass before it < p
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected /= expected.sum()
    torch.manual_seed(0)
    counts = torch.bincount(torch.tensor([pick_code(logits, sampling) for _ in range(4000)]), minlength=5)
    assert counts[~keep].sum() == 0
    assert torch.allclose(counts / 4000, expected, atol=0.03)
    assert pick_code(logits, ImageSampling(temperature=0)) == 0


@pytest.mark.parametrize(("field", "value", "message"), [
    ("guidance_text", -1, "image guidance text scale must be between 0 and 20, got -1"),
    ("guidance_image", float("nan"), "image guidance image scale must be between 0 and 20, got nan"),
    ("temperature", 3, "image temperature must be between 0 and 2, got 3"),
    ("top_p", 0, r"image top_p must be in \(0, 1\], got 0"),
])
def test_image_sampling_settings_are_checked(field, value, message):
    from medtune.models.generation import ImageSampling

    with pytest.raises(ValueError, match=message):
        ImageSampling(**{field: value})


def test_text_answers_hold_no_image_and_images_need_a_decoder(vlm, drawing):
    from medtune.models.generation import GenerationSettings, Generator

    conversation = [{"role": "user", "content": [{"type": "text", "text": "Is it normal?"}]}]
    text_only = Generator(drawing).complete([conversation], [[]], GenerationSettings(max_new_tokens=8))[0]
    assert text_only.images == []
    with pytest.raises(ValueError, match="no image decoder attached"):
        Generator(vlm).complete([conversation], [[]], GenerationSettings(modalities=("image",)))


PLAIN_CHAMELEON = r'''
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

torch.set_num_threads(1)
folder, ids_file, out = sys.argv[1:4]
ids = torch.tensor(json.loads(open(ids_file).read()))
results = {}
for remote in (True, False):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=remote).eval()
    with torch.no_grad():
        results[f"logits_{remote}"] = model(input_ids=ids).logits.contiguous()
    results[f"class_{remote}"] = type(model).__name__
save_file({k: v for k, v in results.items() if k.startswith("logits")}, out + "/logits.safetensors")
json.dump({"classes": {k: v for k, v in results.items() if k.startswith("class")},
           "medtune_modules": sorted(m for m in sys.modules if m.split(".")[0] == "medtune")},
          open(out + "/report.json", "w"))
'''


def test_outside_medtune_the_checkpoint_s_own_class_writes_image_codes(vlm, root, tmp_path):
    """With trust_remote_code, plain transformers (medtune not importable) runs the saved subclass, whose image-code
    logits are medtune's; without it, transformers' Chameleon with its mask."""
    from safetensors.torch import load_file

    vlm.save(tmp_path / "model")
    ids = _batch(vlm, root, [TWO_IMAGES])["input_ids"]
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    run_without_medtune(PLAIN_CHAMELEON, tmp_path, str(tmp_path / "model"), str(tmp_path / "ids.json"), str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["medtune_modules"] == []
    assert report["classes"] == {"class_True": "MedtuneChameleonForConditionalGeneration",
                                 "class_False": "ChameleonForConditionalGeneration"}
    logits = load_file(str(tmp_path / "logits.safetensors"))
    with torch.no_grad():
        ours = vlm.model(input_ids=ids).logits
    assert torch.equal(logits["logits_True"], ours)
    image = torch.tensor(vlm.image_token_ids)
    assert bool((logits["logits_False"][..., image] == torch.finfo(ours.dtype).min).all())
