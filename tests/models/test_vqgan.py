"""The Chameleon/Anole VQGAN decoder (medtune/models/vqgan.py).

Properties: the state dict has exactly the names and shapes of the decoder half of the released ``vqgan.ckpt``;
decoded pixels equal those of an independent decoder assembled from transformers' Janus VQ-VAE blocks on the same
random weights; decoding is deterministic, sized and clamped; bad codes are named; checkpoints load safely; an
image encoded by transformers' ChameleonVQVAE decodes back to an image of the right size.
"""
from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import ChameleonConfig, ChameleonVQVAE, ChameleonVQVAEConfig, JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAEDecoder

from medtune.errors import SpecError
from medtune.models.vqgan import (ChameleonVQGANDecoder, ChameleonVQGANDecoderConfig, LoadReport,
                                  VQGANCheckpointError)

# The decoding half of the released tokenizer/vqgan.ckpt ``state_dict``: name and shape of every tensor of
# taming-transformers' ``Decoder`` (the code Chameleon's vqgan.py says it is taken from) built with the released
# config, plus the quantizer's code book and post_quant_conv. Written out, not computed from medtune's module.
RELEASED_LAYOUT = """
quantize.embedding.weight 8192 256
post_quant_conv.weight 256 256 1 1
post_quant_conv.bias 256
decoder.conv_in.weight 512 256 3 3
decoder.conv_in.bias 512
decoder.mid.block_1.norm1.weight 512
decoder.mid.block_1.norm1.bias 512
decoder.mid.block_1.conv1.weight 512 512 3 3
decoder.mid.block_1.conv1.bias 512
decoder.mid.block_1.norm2.weight 512
decoder.mid.block_1.norm2.bias 512
decoder.mid.block_1.conv2.weight 512 512 3 3
decoder.mid.block_1.conv2.bias 512
decoder.mid.attn_1.norm.weight 512
decoder.mid.attn_1.norm.bias 512
decoder.mid.attn_1.q.weight 512 512 1 1
decoder.mid.attn_1.q.bias 512
decoder.mid.attn_1.k.weight 512 512 1 1
decoder.mid.attn_1.k.bias 512
decoder.mid.attn_1.v.weight 512 512 1 1
decoder.mid.attn_1.v.bias 512
decoder.mid.attn_1.proj_out.weight 512 512 1 1
decoder.mid.attn_1.proj_out.bias 512
decoder.mid.block_2.norm1.weight 512
decoder.mid.block_2.norm1.bias 512
decoder.mid.block_2.conv1.weight 512 512 3 3
decoder.mid.block_2.conv1.bias 512
decoder.mid.block_2.norm2.weight 512
decoder.mid.block_2.norm2.bias 512
decoder.mid.block_2.conv2.weight 512 512 3 3
decoder.mid.block_2.conv2.bias 512
decoder.up.0.block.0.norm1.weight 128
decoder.up.0.block.0.norm1.bias 128
decoder.up.0.block.0.conv1.weight 128 128 3 3
decoder.up.0.block.0.conv1.bias 128
decoder.up.0.block.0.norm2.weight 128
decoder.up.0.block.0.norm2.bias 128
decoder.up.0.block.0.conv2.weight 128 128 3 3
decoder.up.0.block.0.conv2.bias 128
decoder.up.0.block.1.norm1.weight 128
decoder.up.0.block.1.norm1.bias 128
decoder.up.0.block.1.conv1.weight 128 128 3 3
decoder.up.0.block.1.conv1.bias 128
decoder.up.0.block.1.norm2.weight 128
decoder.up.0.block.1.norm2.bias 128
decoder.up.0.block.1.conv2.weight 128 128 3 3
decoder.up.0.block.1.conv2.bias 128
decoder.up.0.block.2.norm1.weight 128
decoder.up.0.block.2.norm1.bias 128
decoder.up.0.block.2.conv1.weight 128 128 3 3
decoder.up.0.block.2.conv1.bias 128
decoder.up.0.block.2.norm2.weight 128
decoder.up.0.block.2.norm2.bias 128
decoder.up.0.block.2.conv2.weight 128 128 3 3
decoder.up.0.block.2.conv2.bias 128
decoder.up.1.block.0.norm1.weight 256
decoder.up.1.block.0.norm1.bias 256
decoder.up.1.block.0.conv1.weight 128 256 3 3
decoder.up.1.block.0.conv1.bias 128
decoder.up.1.block.0.norm2.weight 128
decoder.up.1.block.0.norm2.bias 128
decoder.up.1.block.0.conv2.weight 128 128 3 3
decoder.up.1.block.0.conv2.bias 128
decoder.up.1.block.0.nin_shortcut.weight 128 256 1 1
decoder.up.1.block.0.nin_shortcut.bias 128
decoder.up.1.block.1.norm1.weight 128
decoder.up.1.block.1.norm1.bias 128
decoder.up.1.block.1.conv1.weight 128 128 3 3
decoder.up.1.block.1.conv1.bias 128
decoder.up.1.block.1.norm2.weight 128
decoder.up.1.block.1.norm2.bias 128
decoder.up.1.block.1.conv2.weight 128 128 3 3
decoder.up.1.block.1.conv2.bias 128
decoder.up.1.block.2.norm1.weight 128
decoder.up.1.block.2.norm1.bias 128
decoder.up.1.block.2.conv1.weight 128 128 3 3
decoder.up.1.block.2.conv1.bias 128
decoder.up.1.block.2.norm2.weight 128
decoder.up.1.block.2.norm2.bias 128
decoder.up.1.block.2.conv2.weight 128 128 3 3
decoder.up.1.block.2.conv2.bias 128
decoder.up.1.upsample.conv.weight 128 128 3 3
decoder.up.1.upsample.conv.bias 128
decoder.up.2.block.0.norm1.weight 256
decoder.up.2.block.0.norm1.bias 256
decoder.up.2.block.0.conv1.weight 256 256 3 3
decoder.up.2.block.0.conv1.bias 256
decoder.up.2.block.0.norm2.weight 256
decoder.up.2.block.0.norm2.bias 256
decoder.up.2.block.0.conv2.weight 256 256 3 3
decoder.up.2.block.0.conv2.bias 256
decoder.up.2.block.1.norm1.weight 256
decoder.up.2.block.1.norm1.bias 256
decoder.up.2.block.1.conv1.weight 256 256 3 3
decoder.up.2.block.1.conv1.bias 256
decoder.up.2.block.1.norm2.weight 256
decoder.up.2.block.1.norm2.bias 256
decoder.up.2.block.1.conv2.weight 256 256 3 3
decoder.up.2.block.1.conv2.bias 256
decoder.up.2.block.2.norm1.weight 256
decoder.up.2.block.2.norm1.bias 256
decoder.up.2.block.2.conv1.weight 256 256 3 3
decoder.up.2.block.2.conv1.bias 256
decoder.up.2.block.2.norm2.weight 256
decoder.up.2.block.2.norm2.bias 256
decoder.up.2.block.2.conv2.weight 256 256 3 3
decoder.up.2.block.2.conv2.bias 256
decoder.up.2.upsample.conv.weight 256 256 3 3
decoder.up.2.upsample.conv.bias 256
decoder.up.3.block.0.norm1.weight 512
decoder.up.3.block.0.norm1.bias 512
decoder.up.3.block.0.conv1.weight 256 512 3 3
decoder.up.3.block.0.conv1.bias 256
decoder.up.3.block.0.norm2.weight 256
decoder.up.3.block.0.norm2.bias 256
decoder.up.3.block.0.conv2.weight 256 256 3 3
decoder.up.3.block.0.conv2.bias 256
decoder.up.3.block.0.nin_shortcut.weight 256 512 1 1
decoder.up.3.block.0.nin_shortcut.bias 256
decoder.up.3.block.1.norm1.weight 256
decoder.up.3.block.1.norm1.bias 256
decoder.up.3.block.1.conv1.weight 256 256 3 3
decoder.up.3.block.1.conv1.bias 256
decoder.up.3.block.1.norm2.weight 256
decoder.up.3.block.1.norm2.bias 256
decoder.up.3.block.1.conv2.weight 256 256 3 3
decoder.up.3.block.1.conv2.bias 256
decoder.up.3.block.2.norm1.weight 256
decoder.up.3.block.2.norm1.bias 256
decoder.up.3.block.2.conv1.weight 256 256 3 3
decoder.up.3.block.2.conv1.bias 256
decoder.up.3.block.2.norm2.weight 256
decoder.up.3.block.2.norm2.bias 256
decoder.up.3.block.2.conv2.weight 256 256 3 3
decoder.up.3.block.2.conv2.bias 256
decoder.up.3.upsample.conv.weight 256 256 3 3
decoder.up.3.upsample.conv.bias 256
decoder.up.4.block.0.norm1.weight 512
decoder.up.4.block.0.norm1.bias 512
decoder.up.4.block.0.conv1.weight 512 512 3 3
decoder.up.4.block.0.conv1.bias 512
decoder.up.4.block.0.norm2.weight 512
decoder.up.4.block.0.norm2.bias 512
decoder.up.4.block.0.conv2.weight 512 512 3 3
decoder.up.4.block.0.conv2.bias 512
decoder.up.4.block.1.norm1.weight 512
decoder.up.4.block.1.norm1.bias 512
decoder.up.4.block.1.conv1.weight 512 512 3 3
decoder.up.4.block.1.conv1.bias 512
decoder.up.4.block.1.norm2.weight 512
decoder.up.4.block.1.norm2.bias 512
decoder.up.4.block.1.conv2.weight 512 512 3 3
decoder.up.4.block.1.conv2.bias 512
decoder.up.4.block.2.norm1.weight 512
decoder.up.4.block.2.norm1.bias 512
decoder.up.4.block.2.conv1.weight 512 512 3 3
decoder.up.4.block.2.conv1.bias 512
decoder.up.4.block.2.norm2.weight 512
decoder.up.4.block.2.norm2.bias 512
decoder.up.4.block.2.conv2.weight 512 512 3 3
decoder.up.4.block.2.conv2.bias 512
decoder.up.4.upsample.conv.weight 512 512 3 3
decoder.up.4.upsample.conv.bias 512
decoder.norm_out.weight 128
decoder.norm_out.bias 128
decoder.conv_out.weight 3 128 3 3
decoder.conv_out.bias 3
"""

# ch 32 is the narrowest width GroupNorm(32) allows; two levels give an 8×8 code grid and 16×16 images.
TINY = dict(embed_dim=8, n_embed=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)


def layout(text: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in dims) for name, *dims in (line.split() for line in text.strip().splitlines())}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_decoder(seed: int = 0, **overrides) -> ChameleonVQGANDecoder:
    """A tiny decoder with every weight random (default init leaves the norms at 1 and 0)."""
    torch.manual_seed(seed)
    model = ChameleonVQGANDecoder(ChameleonVQGANDecoderConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


def random_codes(batch: int, seed: int = 0, n_embed: int = 32, count: int = 64) -> torch.Tensor:
    return torch.randint(0, n_embed, (batch, count), generator=torch.Generator().manual_seed(seed))


# --- layout -------------------------------------------------------------------------------------------------------

def test_the_default_config_is_the_released_one():
    config = ChameleonVQGANDecoderConfig()
    assert (config.embed_dim, config.z_channels, config.n_embed, config.ch, config.ch_mult) == \
        (256, 256, 8192, 128, (1, 1, 2, 2, 4))
    assert (config.num_res_blocks, config.attn_resolutions, config.resolution, config.out_ch, config.dropout) == \
        (2, (), 512, 3, 0.0)
    assert (config.latent_size, config.codes_per_image) == (32, 1024)


@pytest.mark.parametrize("attn_resolutions", [(), (16,)])  # released config; MedMax's VQGAN fine-tune config
def test_state_dict_has_exactly_the_released_checkpoint_names_and_shapes(attn_resolutions):
    with torch.device("meta"):  # no memory, no init cost
        model = ChameleonVQGANDecoder(ChameleonVQGANDecoderConfig(attn_resolutions=attn_resolutions))
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert ours == layout(RELEASED_LAYOUT)


def test_the_layout_table_counts_the_published_decoder():
    table = layout(RELEASED_LAYOUT)
    decoder = {name: shape for name, shape in table.items() if name.startswith("decoder.")}
    assert (len(table), len(decoder)) == (167, 164)
    assert sum(int(np.prod(shape)) for shape in decoder.values()) == 39_294_851


# --- configs ------------------------------------------------------------------------------------------------------

RELEASED_YAML = """
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 512
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 250001, codebook_weight: 1.0}
"""


def test_config_reads_the_released_vqgan_yaml_layout(tmp_path):
    path = tmp_path / "vqgan.yaml"
    path.write_text(RELEASED_YAML)
    assert ChameleonVQGANDecoderConfig.from_vqgan_yaml(path) == ChameleonVQGANDecoderConfig()


def test_the_yaml_reader_constructs_no_objects(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "vqgan.yaml"
    path.write_text(f"model: !!python/object/apply:builtins.exec [\"open(r'{marker}', 'w').close()\"]\n")
    with pytest.raises(SpecError, match="not a plain YAML document"):
        ChameleonVQGANDecoderConfig.from_vqgan_yaml(path)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda params: params["ddconfig"].pop("ch"), r"model\.params\.ddconfig\.ch: missing"),
    (lambda params: params["ddconfig"].update(tanh_out=True), r"ddconfig\.tanh_out: True is not supported"),
    (lambda params: params.update(remap="remap.npy"), r"model\.params\.remap"),
    (lambda params: params["ddconfig"].update(ch=16), r"width 16 is not a multiple of the 32 GroupNorm groups"),
])
def test_config_errors_name_the_field(edit, message):
    import yaml
    params = yaml.safe_load(RELEASED_YAML)["model"]["params"]
    edit(params)
    with pytest.raises(SpecError, match=message):
        ChameleonVQGANDecoderConfig.from_vqgan_params(params)


def test_config_from_transformers_mirrors_the_encoder_config():
    assert ChameleonVQGANDecoderConfig.from_transformers(ChameleonVQVAEConfig()) == ChameleonVQGANDecoderConfig()
    tiny = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=8, resolution=16, base_channels=32,
                                channel_multiplier=[1, 2], num_res_blocks=1)
    assert ChameleonVQGANDecoderConfig.from_transformers(ChameleonConfig(vq_config=tiny.to_dict())) == \
        ChameleonVQGANDecoderConfig(**TINY)


# --- parity with an independent implementation ---------------------------------------------------------------------

@pytest.mark.parametrize("level_attention", [False, True])
def test_pixels_equal_a_decoder_assembled_from_transformers_janus_blocks(level_attention):
    """transformers' JanusVQVAEDecoder is the taming decoder with up-levels stored lowest resolution first and
    attention forced at the lowest level; it matches Chameleon's config once that attention is removed, and
    ours with attention at the latent resolution (8) as it is."""
    ours = tiny_decoder(attn_resolutions=(8,) if level_attention else ())
    levels = len(TINY["ch_mult"])
    reference = JanusVQVAEDecoder(JanusVQVAEConfig(
        embed_dim=TINY["embed_dim"], num_embeddings=TINY["n_embed"], latent_channels=TINY["z_channels"],
        base_channels=TINY["ch"], channel_multiplier=list(TINY["ch_mult"]), num_res_blocks=TINY["num_res_blocks"],
        out_channels=3, num_patches=8)).eval()
    if not level_attention:
        for level in reference.up:
            level.attn = nn.ModuleList()

    def janus_name(name: str) -> str:
        level = re.fullmatch(r"up\.(\d+)\.(.*)", name)
        return f"up.{levels - 1 - int(level[1])}.{level[2]}" if level else name

    reference.load_state_dict({janus_name(name.removeprefix("decoder.")): tensor
                               for name, tensor in ours.state_dict().items() if name.startswith("decoder.")},
                              strict=True)
    codes = random_codes(2)
    with torch.no_grad():
        got = ours(codes)
        # The lookup by hand: Janus's own get_codebook_entry L2-normalises code vectors, Chameleon's does not.
        # (Contiguous as in taming: a strided input sends the first conv down a path that rounds differently.)
        latents = F.embedding(codes, ours.quantize.embedding.weight).view(2, 8, 8, -1).permute(0, 3, 1, 2)
        latents = latents.contiguous()
        expected = reference(F.conv2d(latents, ours.post_quant_conv.weight, ours.post_quant_conv.bias))
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert expected.abs().max() > 1.0  # not two near-zero tensors
    # measured 3e-6 (4e-6 with level attention) on outputs up to 3.6 (5.1): SDPA and F.silu against bmm and
    # x·sigmoid(x) round differently in float32
    assert (got - expected).abs().max() < 1e-5


# --- decoding -----------------------------------------------------------------------------------------------------

def test_decode_is_deterministic_sized_and_clamped():
    model = tiny_decoder()
    codes = random_codes(3)
    pixels = model.decode(codes)
    assert pixels.shape == (3, 3, 16, 16)
    assert torch.equal(model.decode(codes), pixels)
    assert torch.equal(model.decode(codes.view(3, 8, 8)), pixels)  # flat codes are the grid in row-major order
    torch.testing.assert_close(model.decode(codes[1:2]), pixels[1:2])  # an image does not depend on its batch
    with torch.no_grad():
        raw = model(codes)
    assert raw.abs().max() > 1.0 and torch.equal(pixels, raw.clamp(-1, 1))
    images = model.to_image(pixels)
    assert [(image.mode, image.size) for image in images] == [("RGB", (16, 16))] * 3


def test_to_image_maps_minus_one_to_one_onto_uint8_truncating_like_chameleon():
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    pixels = values.view(1, 1, 1, 6).expand(1, 3, 1, 6)
    (image,) = ChameleonVQGANDecoder.to_image(pixels)
    assert image.size == (6, 1)
    assert np.array(image)[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


@pytest.mark.parametrize("bad", [32, -1])
def test_out_of_range_codes_are_refused_by_value_and_position(bad):
    codes = random_codes(2)
    codes[1, 17] = bad
    with pytest.raises(ValueError, match=rf"image code {bad} at codes\[1, 17\] is outside the code book \[0, 32\)"):
        tiny_decoder().decode(codes)


def test_codes_of_the_wrong_kind_or_shape_are_refused():
    model = tiny_decoder()
    with pytest.raises(TypeError, match="integer tensor"):
        model.decode(random_codes(1).float())
    with pytest.raises(ValueError, match=r"shape \(batch, 64\) or \(batch, 8, 8\), got \(1, 63\)"):
        model.decode(random_codes(1, count=63))


# --- checkpoints --------------------------------------------------------------------------------------------------

def lightning_checkpoint(model: ChameleonVQGANDecoder, **extra) -> dict:
    """What a Lightning-trained taming VQModel saves: its whole state dict (encoder, loss too) plus bookkeeping."""
    state = {**model.state_dict(), "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3),
             "quant_conv.weight": torch.zeros(8, 8, 1, 1), "loss.discriminator.main.0.weight": torch.zeros(4)}
    return {"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-06}]}], **extra}


@pytest.mark.parametrize("file_format", ["lightning", "plain state dict", "safetensors"])
def test_load_checkpoint_reads_the_decoder_half(tmp_path, file_format):
    source = tiny_decoder(seed=1)
    if file_format == "safetensors":
        path = tmp_path / "vqgan.safetensors"
        save_file(source.state_dict(), str(path))
    else:
        path = tmp_path / "vqgan.ckpt"
        torch.save(lightning_checkpoint(source) if file_format == "lightning" else source.state_dict(), path)
    target = tiny_decoder(seed=2)
    report = target.load_checkpoint(path)
    assert report == LoadReport(missing=(), unexpected=(), ignored=3 if file_format == "lightning" else 0)
    codes = random_codes(2)
    assert torch.equal(target.decode(codes), source.decode(codes))


@pytest.mark.parametrize("kind", ["hyper-parameters object", "code run when unpickled"])
def test_a_checkpoint_holding_an_object_is_refused_unexecuted(tmp_path, kind):
    marker = tmp_path / "executed"

    class RunsCodeWhenUnpickled:
        def __reduce__(self):
            return exec, (f"open(r'{marker}', 'w').close()",)

    # old Lightning versions saved hyper-parameters as an argparse.Namespace
    held, named = ((argparse.Namespace(lr=4.5e-06), "argparse.Namespace") if kind == "hyper-parameters object"
                   else (RunsCodeWhenUnpickled(), "exec"))
    path = tmp_path / "vqgan.ckpt"
    torch.save(lightning_checkpoint(tiny_decoder(), hyper_parameters=held), path)
    with pytest.raises(VQGANCheckpointError,
                       match=rf"vqgan\.ckpt: refused by torch\.load\(weights_only=True\): it holds {named}, "):
        tiny_decoder().load_checkpoint(path)
    assert not marker.exists()


def test_missing_and_unexpected_decoder_keys_are_named(tmp_path):
    source, target = tiny_decoder(seed=1), tiny_decoder(seed=2)
    checkpoint = lightning_checkpoint(source)
    dropped = ["decoder.up.0.block.1.conv2.weight", "post_quant_conv.bias"]
    for name in dropped:
        del checkpoint["state_dict"][name]
    checkpoint["state_dict"]["decoder.up.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "vqgan.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(VQGANCheckpointError, match=r"2 decoder weights missing: decoder\.up\.0\.block\.1\.conv2\."
                                                   r"weight, post_quant_conv\.bias; 1 unexpected: decoder\.up\.0\."
                                                   r"attn\.0\.q\.weight"):
        target.load_checkpoint(path)
    kept = target.state_dict()["post_quant_conv.bias"].clone()
    report = target.load_checkpoint(path, strict=False)
    assert report == LoadReport(missing=tuple(sorted(dropped)), unexpected=("decoder.up.0.attn.0.q.weight",),
                                ignored=3)
    assert torch.equal(target.state_dict()["post_quant_conv.bias"], kept)  # a missing weight keeps its value
    assert torch.equal(target.post_quant_conv.weight, source.post_quant_conv.weight)


def test_wrong_shapes_and_files_without_a_state_dict_are_refused(tmp_path):
    checkpoint = lightning_checkpoint(tiny_decoder())
    checkpoint["state_dict"]["quantize.embedding.weight"] = torch.zeros(16, 8)
    path = tmp_path / "vqgan.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(VQGANCheckpointError,
                       match=r"quantize\.embedding\.weight \[16, 8\] \(decoder expects \[32, 8\]\)"):
        tiny_decoder().load_checkpoint(path, strict=False)
    torch.save([1, 2, 3], path)
    with pytest.raises(VQGANCheckpointError, match="no state_dict of tensors"):
        tiny_decoder().load_checkpoint(path)


# --- round trip with transformers' Chameleon encoder -----------------------------------------------------------------

def test_round_trip_image_codes_image_with_a_tiny_chameleon_vqvae():
    torch.manual_seed(0)
    vq_config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=8, resolution=16,
                                     base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1)
    encoder = ChameleonVQVAE(vq_config).eval()
    decoder = ChameleonVQGANDecoder(ChameleonVQGANDecoderConfig.from_transformers(vq_config))
    # transformers' model carries the code book and post_quant_conv under the checkpoint's names; only the
    # decoder proper is new (random here: this checks plumbing, not fidelity)
    report = decoder.load_weights(encoder.state_dict(), strict=False)
    assert report.unexpected == ()
    assert set(report.missing) == {name for name in decoder.state_dict() if name.startswith("decoder.")}
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        encoded = encoder.encode(images)
    codes = encoded.image_tokens.view(2, -1)
    assert codes.shape == (2, 64) and int(codes.min()) >= 0 and int(codes.max()) < 32
    # the decoder looks up exactly the vectors the encoder quantized to, in the same grid order
    torch.testing.assert_close(decoder.latents(codes), encoded.quantized_last_hidden_state)
    pixels = decoder.decode(codes)
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        again = decoder.decode(encoder.encode(images).image_tokens.view(2, -1))
    assert torch.equal(again, pixels)
    assert [image.size for image in decoder.to_image(pixels)] == [(16, 16)] * 2
