"""VQ image tokenizers (medtune/models/vq.py) on tiny random Chameleon, Emu3 and Janus models.

The builders here (``tiny_chameleon`` …) are imported by test_tokenize_images.py as well.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from medtune.models import vq  # noqa: E402
from medtune.models.vq import image_tokenizer  # noqa: E402

torch.set_num_threads(1)
CODEBOOK = 16


def _chameleon_image_name(code: int) -> str:
    """Chameleon's vocabulary names image code 123 "IMGIMGBCDZ" (digits as the letters A-J)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def tiny_chameleon(seed: int = 0, image_ids: list[int] | None = None):
    """A 32-px Chameleon whose VQ has 16 codes on an 8x8 grid; ``image_ids[c]`` is code c's token id
    (default 4 + c, MedMax's offset)."""
    image_ids = image_ids or [4 + code for code in range(CODEBOOK)]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({_chameleon_image_name(code): image_ids[code] for code in range(CODEBOOK)})
    vocab.update({"<eoss>": 20, "<racm3:break>": 21, "<reserved08706>": 22, "<image>": 23})
    vocab.update({f"t{i}": i for i in range(24, 64)})
    config = transformers.ChameleonConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        vocabulary_map=vocab, vq_config=dict(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=8, resolution=32,
                                             base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1,
                                             attn_resolutions=None))
    torch.manual_seed(seed)
    return transformers.ChameleonForConditionalGeneration(config).eval()


def tiny_emu3():
    vocab = {"<|endoftext|>": 0, "<|extra_203|>": 1, "<|extra_204|>": 2, "<image>": 3, "<|image start|>": 4,
             "<|image end|>": 5, "<|image token|>": 6, "<|extra_200|>": 7, "<|extra_201|>": 8}
    vocab.update({f"<|visual token {code:06d}|>": 9 + code for code in range(CODEBOOK)})
    vocab.update({f"t{i}": i for i in range(9 + CODEBOOK, 64)})
    config = transformers.Emu3Config(
        vocabulary_map=vocab,
        vq_config=dict(codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, in_channels=3, out_channels=3,
                       temporal_downsample_factor=2, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                       num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    return transformers.Emu3ForConditionalGeneration(config).eval()


def tiny_janus():
    config = transformers.JanusConfig(
        image_token_id=3,
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=32, depth=1, num_image_tokens=16, mlp_ratio=2.0),
        vq_config=dict(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, projection_dim=32, image_token_embed_dim=32,
                       num_hidden_layers=1))
    torch.manual_seed(0)
    return transformers.JanusForConditionalGeneration(config).eval()


def tiny_emu3_processor():
    return transformers.Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=64 * 64, spatial_factor=8)


def random_images(count: int = 4, seed: int = 0) -> list[Image.Image]:
    """Non-square RGB, RGBA and greyscale images of 20-60 px."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(20, 60, size=2))
        mode, channels = [("RGB", 3), ("RGBA", 4), ("L", 1)][index % 3]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        images.append(Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode))
    return images


@pytest.fixture(scope="module")
def models():
    return {"chameleon": tiny_chameleon(), "emu3": tiny_emu3(), "janus": tiny_janus()}


@pytest.fixture(scope="module")
def tokenizers(models):
    return {"chameleon": image_tokenizer(models["chameleon"]),
            "emu3": image_tokenizer(models["emu3"], image_processor=tiny_emu3_processor(), image_size=32),
            "janus": image_tokenizer(models["janus"])}


# ------------------------------------------------------------------------------------------------- encoding

@pytest.mark.parametrize("family, grid", [("chameleon", (8, 8)), ("emu3", (4, 4)), ("janus", (4, 4))])
def test_encode_is_batched_in_range_deterministic_and_equal_to_one_at_a_time(tokenizers, family, grid):
    tokenizer = tokenizers[family]
    images = random_images(5)
    codes = tokenizer.encode(images)
    assert tokenizer.family == family and tokenizer.grid == grid
    assert codes.shape == (5, tokenizer.codes_per_image) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < tokenizer.codebook_size == CODEBOOK
    assert len(set(codes.flatten().tolist())) > 1  # a real encoding, not a constant
    assert torch.equal(tokenizer.encode(images), codes)
    assert torch.equal(torch.cat([tokenizer.encode([image]) for image in images]), codes)
    assert tokenizer.encode([]).shape == (0, tokenizer.codes_per_image)


@pytest.mark.parametrize("family", ["emu3", "janus"])
def test_decode_round_trip_gives_images_of_the_model_size_deterministically(tokenizers, family):
    tokenizer = tokenizers[family]
    assert tokenizer.has_decoder
    codes = tokenizer.encode(random_images(2))
    images = tokenizer.decode(codes)
    assert [image.size for image in images] == [(32, 32)] * 2 and {image.mode for image in images} == {"RGB"}
    arrays = [np.asarray(image) for image in images]
    assert all(a.dtype == np.uint8 and a.min() >= 0 and a.max() <= 255 and a.std() > 0 for a in arrays)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, tokenizer.decode(codes)))
    assert tokenizer.encode(images).shape == codes.shape  # decoded images tokenize again
    with pytest.raises(vq.CodeRangeError, match="outside the code book"):
        tokenizer.decode(torch.full_like(codes, CODEBOOK))


# ---------------------------------------------------------------------------------------------- token ids

def test_chameleon_ids_are_the_models_own_and_agree_with_medmax_offset(models, tokenizers):
    model, tokenizer = models["chameleon"], tokenizers["chameleon"]
    images = random_images(3)
    codes = tokenizer.encode(images)
    ids = tokenizer.codes_to_token_ids(codes)
    assert torch.equal(ids, model.model.get_image_tokens(tokenizer.preprocess(images)).long())
    assert tokenizer.medmax_offset == vq.MEDMAX_IMAGE_TOKEN_OFFSET == 4
    assert torch.equal(ids, codes + 4)  # MedMax's rule, on a vocabulary where it holds
    assert torch.equal(tokenizer.token_ids_to_codes(ids), codes)
    with pytest.raises(vq.CodeRangeError, match="id 23 .* is not an image token"):
        tokenizer.token_ids_to_codes(torch.tensor([4, 23]))


def test_chameleon_ids_follow_a_vocabulary_where_medmax_offset_does_not_hold():
    shuffled = [4 + code for code in np.random.default_rng(1).permutation(CODEBOOK).tolist()]
    model = tiny_chameleon(image_ids=shuffled)
    tokenizer = image_tokenizer(model)
    images = random_images(2)
    codes = tokenizer.encode(images)
    assert tokenizer.medmax_offset is None
    assert torch.equal(tokenizer.codes_to_token_ids(codes), model.model.get_image_tokens(
        tokenizer.preprocess(images)).long())
    assert torch.equal(tokenizer.codes_to_token_ids(torch.arange(CODEBOOK)), torch.tensor(shuffled))


def test_emu3_ids_are_its_visual_tokens_without_the_row_ends(models, tokenizers):
    model, tokenizer = models["emu3"], tokenizers["emu3"]
    images = random_images(1)
    ids = tokenizer.codes_to_token_ids(tokenizer.encode(images))
    pixels = tokenizer.preprocess(images)
    with_row_ends = model.model.get_image_tokens(pixels, torch.tensor([[32, 32]])).view(4, 5)
    assert torch.equal(ids.view(4, 4), with_row_ends[:, :4].long())
    assert (with_row_ends[:, 4] == model.config.vocabulary_map["<|extra_200|>"]).all()


def test_janus_ids_are_the_codes(models, tokenizers):
    tokenizer = tokenizers["janus"]
    images = random_images(2)
    codes = tokenizer.encode(images)
    native = models["janus"].model.vqmodel.encode(tokenizer.preprocess(images)).image_tokens.view(2, -1)
    assert torch.equal(codes, native) and torch.equal(tokenizer.codes_to_token_ids(codes), codes)


# ------------------------------------------------------------------------------------ MedMax preprocessing

def test_medmax_preprocessing_of_a_transparent_non_square_image_matches_the_hand_computation():
    rgba = np.array([[(10, 20, 30, 255), (101, 151, 201, 128), (0, 0, 0, 0), (9, 9, 9, 255)],
                     [(50, 60, 70, 255), (200, 100, 10, 64), (80, 90, 100, 255), (1, 2, 3, 255)]], np.uint8)
    pixels = vq.medmax_preprocess(Image.fromarray(rgba, "RGBA"), size=2)
    # 4x2 -> shortest side already 2 (no resize); centre crop keeps columns 1 and 2. Alpha on white, truncated:
    # (1 - 128/255) * 255 + 128/255 * (101, 151, 201) = (177.70, 202.80, 227.89) -> (177, 202, 227)
    # (1 - 64/255) * 255 + 64/255 * (200, 100, 10) = (241.20, 216.10, 193.51) -> (241, 216, 193)
    # alpha 0 -> white; opaque pixels unchanged.
    expected = np.array([[(177, 202, 227), (255, 255, 255)], [(241, 216, 193), (80, 90, 100)]], np.float64)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 2, 2)
    assert torch.equal(pixels, torch.from_numpy(expected / 255.0 * 2 - 1).permute(2, 0, 1).float())
    assert float(pixels[:, 0, 1].min()) == 1.0  # white is exactly 1 (2/255 scaling, not 0.0078)
    composited = Image.alpha_composite(Image.new("RGBA", (4, 2), "white"), Image.fromarray(rgba, "RGBA"))
    assert np.asarray(composited)[0, 1, :3].tolist() == [178, 203, 228]  # why PIL's rounding compositing is not used


def test_medmax_resize_rounds_the_long_side_and_crops_the_centre():
    assert vq.medmax_resize_size(7, 3, 2) == (5, 2)  # 7 * 2/3 = 4.67 -> 5 (truncation would give 4)
    assert vq.medmax_resize_size(3, 7, 2) == (2, 5)
    assert vq.medmax_crop_box(5, 2, 2) == (1, 0, 3, 2) and vq.medmax_crop_box(2, 5, 2) == (0, 1, 2, 3)
    image = random_images(1, seed=3)[0].resize((7, 3))
    by_hand = np.asarray(image.resize((5, 2), Image.LANCZOS).crop((1, 0, 3, 2))) / 255.0 * 2 - 1
    assert torch.equal(vq.medmax_preprocess(image, 2), torch.from_numpy(by_hand).permute(2, 0, 1).float())


def test_medmax_preprocessing_equals_transformers_where_their_rules_coincide():
    from transformers import ChameleonImageProcessorPil

    image = random_images(1, seed=5)[0].resize((64, 32))  # RGB; scale 1, so rounding rules cannot differ
    processor = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           rescale_factor=2 / 255)
    reference = torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])
    # The same 8-bit pixels; transformers scales in float32, MedMax in float64, hence the last-bit tolerance.
    assert float((vq.medmax_preprocess(image, 32) - reference).abs().max()) < 1e-6


# ------------------------------------------------------------------------------------------ decoder, loading

class FakeChameleonDecoder:
    """The interface of medtune.models.vqgan.ChameleonVQGANDecoder: decode(codes) -> [-1, 1], to_image(pixels)."""

    def __init__(self):
        self.seen = []

    def decode(self, codes):
        self.seen.append(codes.clone())
        return torch.linspace(-1, 1, 3 * 32 * 32).view(1, 3, 32, 32).expand(len(codes), -1, -1, -1)

    @staticmethod
    def to_image(pixels):
        arrays = ((pixels + 1) / 2 * 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
        return [Image.fromarray(array) for array in arrays]


def test_chameleon_decodes_only_with_an_attached_decoder(models, tokenizers):
    codes = tokenizers["chameleon"].encode(random_images(2))
    assert not tokenizers["chameleon"].has_decoder
    with pytest.raises(vq.NoDecoderError, match="encoder-only.*ChameleonVQGANDecoder"):
        tokenizers["chameleon"].decode(codes)
    decoder = FakeChameleonDecoder()
    with_decoder = image_tokenizer(models["chameleon"], decoder=decoder)
    images = with_decoder.decode(codes)
    assert with_decoder.has_decoder and [image.size for image in images] == [(32, 32)] * 2
    assert torch.equal(decoder.seen[0], codes)  # raw codes, not token ids


def test_a_checkpoint_path_loads_only_the_vq_weights(models, tokenizers, tmp_path, monkeypatch):
    models["chameleon"].save_pretrained(tmp_path / "chameleon")

    def refuse(*args, **kwargs):
        raise AssertionError("the full model was loaded")

    monkeypatch.setattr(transformers.ChameleonForConditionalGeneration, "from_pretrained", refuse)
    from_path = image_tokenizer(tmp_path / "chameleon")
    images = random_images(3)
    assert from_path.dtype == torch.float32 and str(from_path.device) == "cpu"
    assert torch.equal(from_path.encode(images), tokenizers["chameleon"].encode(images))
    assert from_path.fingerprint() == tokenizers["chameleon"].fingerprint()
    assert from_path.fingerprint() != image_tokenizer(tiny_chameleon(seed=1)).fingerprint()


def test_a_model_without_a_vq_tokenizer_is_a_clear_error():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(vq.NoImageTokenizerError, match="LlamaForCausalLM .*LlamaConfig.* no VQ image tokenizer.*"
                                                       "chameleon .*emu3 .*janus"):
        image_tokenizer(llama)


def test_emu3_sizes_its_processor_cannot_keep_are_refused(models):
    with pytest.raises(vq.SpecError, match="image_size 72 .*resize 72x72 to 64x64"):
        image_tokenizer(models["emu3"], image_processor=tiny_emu3_processor(), image_size=72)
    default = image_tokenizer(models["emu3"], image_processor=tiny_emu3_processor())
    assert default.image_size == 64 and default.grid == (8, 8)  # 720 px clamped to the processor's 64x64 maximum
