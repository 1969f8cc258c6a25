"""The discrete-token kind: a mixed-modal model that reads (and writes) images as VQ codes in its vocabulary.

Chameleon / Anole, as MedMax trains them. An image is no pixel input: it is a block of tokens,
``[begin-of-image] + the image's codes mapped to vocabulary ids + [end-of-image]``, in the same sequence as the
text, so one causal LM predicts both.

Choices:

* Text is rendered with a medtune chat template (``chameleon`` by default: BOS, user turns ending with the
  end-of-turn token, replies ending with EOS) and tokenised in one call, so training ids equal serving ids; each
  image placeholder is then replaced by its image block.
* Codes come from the sample when it carries them (MedMax's ``image_tokens`` column, or a tokenize-images file
  named by the stage data's ``image_codes``: raw codes, one list per image) and from the model's own VQ encoder
  otherwise (:mod:`medtune.models.vq`, MedMax's preprocessing); codes are checked against the code book either
  way. Ids follow the model's own vocabulary map (MedMax's ``code + 4`` where that rule holds).
* Labels per role over *all* turns (``label_rule: roles``): a reply's text, its image blocks and its EOS train;
  user turns, including their images, do not. MedMax's rule, everything after the first end-of-turn token
  (``first_separator``), is selectable; a sample without that token is an error (MedMax's collator raised, or
  masked nothing, depending on the batch).
* Truncation never cuts an image block: a sample is cut at the end only where every block stays whole and a label
  remains, else skipped and counted.
* Training lifts Chameleon's image-logit mask (:class:`medtune.models.chameleon.MedtuneChameleonForConditionalGeneration`),
  so the loss over image-code labels is the plain cross-entropy; text generation suppresses image codes instead.
* Encoded samples hold token ids only (the codes are in them), so they go through the token cache, and batches
  are plain padded or packed rows: there is no vision tower to keep busy.
* Answers with images: generation runs through :class:`ImageBlockLogitsProcessor`, which keeps image codes out
  of text, lets an image begin only when the settings allow images and a pixel decoder is attached, then allows
  exactly one image's codes and closes the block. Generated codes become pixels through the attached decoder
  (Chameleon/Anole: :class:`medtune.models.vqgan.ChameleonVQGANDecoder`, whose weights are not in Hugging Face
  Chameleon checkpoints; attach them from the released ``vqgan.yaml`` + ``vqgan.ckpt`` with
  :meth:`DiscreteVLM.attach_decoder`, and the checkpoint then carries them beside its weights).
  Image codes are picked as Chameleon's image decoder (which MedMax runs) picks them: classifier-free guidance over
  three prompt streams, then their own temperature and top-p (:mod:`medtune.models.image_guidance`; the settings
  are ``GenerationSettings.image``, Chameleon's defaults unless changed).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from medtune.models.batch import IGNORE_INDEX
from medtune.models.kinds.base import VLM, recorded_experts, with_recorded_experts

LABEL_RULES = ("roles", "first_separator")
CODES_KEY = "image_tokens"   # MedMax's column for an image's raw codes (meta.extra after reading)
DECODER_WEIGHTS, DECODER_CONFIG = "vqgan_decoder.safetensors", "vqgan_decoder.json"


@dataclass(kw_only=True)
class DiscreteVLM(VLM):
    kind: ClassVar[str] = "discrete"
    parts: ClassVar[tuple[str, ...]] = ("vision", "llm")
    part_markers: ClassVar = (
        ("vision", ("vqmodel",)),   # the VQ image tokenizer: it runs when samples are encoded, not in training
        ("llm", ("embed_tokens", "layers", "norm", "lm_head")),
    )

    template: str = "chameleon"
    boi_token: str = "<racm3:break>"
    eoi_token: str = "<eoss>"
    end_of_turn_token: str = "<reserved08706>"
    label_rule: str = "roles"
    image_tokenizer: Any = field(default=None, repr=False)
    """The model's VQ tokenizer (:class:`medtune.models.vq.ImageTokenizer`)."""

    # ---- building and loading ---------------------------------------------------------------------------

    @classmethod
    def assemble(cls, model, tokenizer, *, template: str = "chameleon", label_rule: str = "roles") -> DiscreteVLM:
        """The kind object around a loaded Chameleon-family model and its tokenizer."""
        from medtune.models.vq import image_tokenizer

        vq = image_tokenizer(model)
        if vq.family != "chameleon":
            raise ValueError(f"discrete-token training covers the Chameleon family (begin + codes + end blocks); "
                             f"{vq.family} models are supported by tokenize-images and image decoding only")
        model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id,
                                                       tokenizer.convert_tokens_to_ids(cls.end_of_turn_token)})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_token = "<image>"   # Chameleon's image placeholder (MedMax renames <reserved08707> to it)
        vlm = cls(model=model, tokenizer=tokenizer, template=template, image_token=image_token,
                  image_token_id=tokenizer.convert_tokens_to_ids(image_token), image_size=vq.image_size,
                  label_rule=label_rule, image_tokenizer=vq)
        for name in (vlm.boi_token, vlm.eoi_token, vlm.end_of_turn_token, vlm.image_token):
            if tokenizer.convert_tokens_to_ids(name) in (None, tokenizer.unk_token_id):
                raise ValueError(f"the tokenizer has no {name!r} token, which a Chameleon model needs")
        return vlm

    @classmethod
    def load(cls, source: str, metadata: dict[str, Any] | None, *, model_kwargs: dict, device: str) -> DiscreteVLM:
        from transformers import AutoTokenizer

        from medtune.models.chameleon import MedtuneChameleonForConditionalGeneration
        from medtune.models.templates import get_template

        metadata = metadata or {}
        experts = recorded_experts(metadata)
        model_class = with_recorded_experts(MedtuneChameleonForConditionalGeneration, experts)
        model = model_class.from_pretrained(source, **model_kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        template = metadata.get("template", "chameleon")
        if not tokenizer.chat_template:
            tokenizer.chat_template = get_template(template).jinja
        vlm = cls.assemble(model, tokenizer, template=template, label_rule=metadata.get("label_rule", "roles"))
        vlm.sample_metadata = tuple(metadata.get("sample_metadata", ()))
        if (Path(source) / DECODER_WEIGHTS).is_file():
            vlm.attach_decoder(Path(source))
        vlm.experts = experts
        return vlm

    def attach_decoder(self, source) -> None:
        """Give the model's image tokenizer a pixel decoder: a ChameleonVQGANDecoder, a folder holding
        ``vqgan_decoder.safetensors`` + ``.json`` (what medtune saves), or one holding Chameleon's released
        ``vqgan.yaml`` + ``vqgan.ckpt`` (read without running pickles)."""
        from medtune.models.vqgan import ChameleonVQGANDecoder, ChameleonVQGANDecoderConfig

        decoder = source
        if isinstance(source, (str, Path)):
            folder = Path(source)
            if (folder / DECODER_WEIGHTS).is_file():
                settings = json.loads((folder / DECODER_CONFIG).read_text(encoding="utf-8"))
                decoder = ChameleonVQGANDecoder(ChameleonVQGANDecoderConfig(**settings))
                decoder.load_checkpoint(folder / DECODER_WEIGHTS)
            elif (folder / "vqgan.yaml").is_file() and (folder / "vqgan.ckpt").is_file():
                decoder = ChameleonVQGANDecoder.from_vqgan_files(folder / "vqgan.yaml", folder / "vqgan.ckpt")
            else:
                raise FileNotFoundError(f"{folder}: neither {DECODER_WEIGHTS} nor vqgan.yaml + vqgan.ckpt")
        if decoder.config.codes_per_image != self.image_tokenizer.codes_per_image:
            raise ValueError(f"the decoder makes images of {decoder.config.codes_per_image} codes, the model's VQ "
                             f"{self.image_tokenizer.codes_per_image}")
        self.image_tokenizer.decoder = decoder.eval()

    # ---- samples -> token ids ---------------------------------------------------------------------------

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @functools.cached_property
    def image_token_ids(self) -> list[int]:
        """Every vocabulary id that stands for an image code."""
        import torch

        return self.image_tokenizer.codes_to_token_ids(torch.arange(self.image_tokenizer.codebook_size)).tolist()

    def encode_tokens(self, sample, *, max_length: int, truncation: str = "text", image_root=None,
                      allowed_roots: Sequence = ()) -> dict[str, list]:
        from medtune.models.processing import SkipSample, tokenize_segments
        from medtune.models.templates import get_template, render_with_tokenizer, to_chat_messages

        segments = render_with_tokenizer(get_template(self.template), to_chat_messages(sample), self.tokenizer,
                                         image_token=self.image_token)
        ids, trainable = tokenize_segments(segments, self.tokenizer)
        if ids.count(self.image_token_id) != len(sample.images):
            raise SkipSample("image token in text", f"{ids.count(self.image_token_id)} image tokens for "
                                                    f"{len(sample.images)} images")
        labels = self._labels(ids, trainable)
        blocks = self._image_blocks(sample, image_root, allowed_roots)
        out_ids, out_labels, spans = [], [], []
        images = iter(blocks)
        for token, label in zip(ids, labels):
            if token != self.image_token_id:
                out_ids.append(token)
                out_labels.append(label)
                continue
            block = next(images)
            spans.append((len(out_ids), len(out_ids) + len(block)))
            out_ids += block
            out_labels += block if label != IGNORE_INDEX else [IGNORE_INDEX] * len(block)
        out_ids, out_labels = self._truncate(out_ids, out_labels, spans, max_length, truncation)
        if all(label == IGNORE_INDEX for label in out_labels[1:]):
            raise SkipSample("no assistant reply")
        return self.token_row(out_ids, out_labels, self.carried_metadata(sample))

    def _labels(self, ids: list[int], trainable: list[bool]) -> list[int]:
        from medtune.models.processing import SkipSample

        if self.label_rule == "roles":
            return [token if train else IGNORE_INDEX for token, train in zip(ids, trainable)]
        separator = self.token_id(self.end_of_turn_token)
        if separator not in ids:
            raise SkipSample("no end-of-turn separator", f"label_rule first_separator needs {self.end_of_turn_token}")
        cut = ids.index(separator) + 1   # MedMax masks up to and including the first separator
        return [IGNORE_INDEX] * cut + ids[cut:]

    def _image_blocks(self, sample, image_root, allowed_roots) -> list[list[int]]:
        """[begin] + ids of the image's codes + [end], for every image of the sample, in order."""
        import torch

        from medtune.models.processing import SkipSample, load_images
        from medtune.models.vq import CodeRangeError, check_codes

        if not sample.images:
            return []
        codes = _carried_codes(sample, self.image_tokenizer.codes_per_image)
        if codes is None:
            if image_root is None:
                raise SkipSample("no image codes", "the sample carries no codes and no image root was given")
            codes = self.image_tokenizer.encode(load_images(sample.images, image_root, allowed_roots=allowed_roots))
        codes = torch.as_tensor(codes, dtype=torch.long)
        try:
            check_codes(codes, self.image_tokenizer.codebook_size)
        except CodeRangeError as error:
            raise SkipSample("image codes out of range", str(error)) from None
        ids = self.image_tokenizer.codes_to_token_ids(codes).tolist()
        boi, eoi = self.token_id(self.boi_token), self.token_id(self.eoi_token)
        return [[boi, *row, eoi] for row in ids]

    @staticmethod
    def _truncate(ids, labels, spans, max_length: int, truncation: str):
        from medtune.models.processing import TRUNCATION_MODES, SkipSample

        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
        if len(ids) <= max_length:
            return ids, labels
        if truncation == "drop":
            raise SkipSample("too long", f"{len(ids)} tokens > max_length {max_length}")
        if any(start < max_length < end or end > max_length for start, end in spans):
            raise SkipSample("too long", f"{len(ids)} tokens; cutting to {max_length} would cut an image")
        return ids[:max_length], labels[:max_length]

    def encode_sample(self, sample, image_root, *, max_length: int, truncation: str = "text",
                      allowed_roots: Sequence = ()) -> dict[str, Any]:
        return self.encode_tokens(sample, max_length=max_length, truncation=truncation, image_root=image_root,
                                  allowed_roots=allowed_roots)

    def inputs_from_tokens(self, row: dict[str, Any], image_refs: list, image_root, *,
                           allowed_roots: Sequence = (), memo=None) -> dict[str, Any]:
        return self.token_row(row["input_ids"], row["labels"], row.get("sample_metadata"))

    def check_images(self, image_refs: list, image_root, *, allowed_roots: Sequence = ()) -> None:
        """Nothing to do: encoding already turned every image into codes (or used the sample's own)."""

    def encode_prompt(self, messages: list[dict], images: list) -> dict[str, Any]:
        import torch

        from medtune.models.processing import tokenize_segments
        from medtune.models.templates import get_template, render_with_tokenizer

        segments = render_with_tokenizer(get_template(self.template), messages, self.tokenizer,
                                         add_generation_prompt=True, image_token=self.image_token)
        ids, _ = tokenize_segments(segments, self.tokenizer)
        if ids.count(self.image_token_id) != len(images):
            raise ValueError(f"the conversation has {ids.count(self.image_token_id)} image places but "
                             f"{len(images)} images were given")
        blocks = iter(self._blocks_of_images(images))
        expanded = [piece for token in ids for piece in (next(blocks) if token == self.image_token_id else [token])]
        return {"input_ids": torch.tensor([expanded]), "attention_mask": torch.ones(1, len(expanded), dtype=torch.long)}

    def _blocks_of_images(self, images: list) -> list[list[int]]:
        if not images:
            return []
        ids = self.image_tokenizer.codes_to_token_ids(self.image_tokenizer.encode(images)).tolist()
        boi, eoi = self.token_id(self.boi_token), self.token_id(self.eoi_token)
        return [[boi, *row, eoi] for row in ids]

    def generation_kwargs(self, settings) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        if "image" in settings.modalities and not self.image_tokenizer.has_decoder:
            raise ValueError("this model has no image decoder attached, so it cannot answer with images; attach "
                             "Chameleon's VQGAN decoder (vqgan.yaml + vqgan.ckpt) first")
        boi, eoi = self.token_id(self.boi_token), self.token_id(self.eoi_token)
        streams = None
        if "image" in settings.modalities and settings.image.guided:
            from medtune.models.generation import padding_id
            from medtune.models.image_guidance import GuidanceStreams

            streams = GuidanceStreams(self.model, bos=self.tokenizer.bos_token_id, boi=boi, eoi=eoi,
                                      image_ids=self.image_token_ids, pad=padding_id(self.tokenizer),
                                      sampling=settings.image)
        processor = ImageBlockLogitsProcessor(
            self.image_token_ids, boi, eoi, self.image_tokenizer.codes_per_image, self.tokenizer.eos_token_id,
            settings.modalities, sampling=settings.image, streams=streams)
        return {"logits_processor": LogitsProcessorList([processor])}

    def decode_output(self, ids: list[int]) -> tuple[str, list]:
        """The text between image blocks, and each complete block's image (through the attached decoder)."""
        import torch

        boi, eoi = self.token_id(self.boi_token), self.token_id(self.eoi_token)
        codes = set(self.image_token_ids)
        text_ids, blocks, block = [], [], None
        for token in ids:
            if token == boi:
                block = []
            elif token == eoi and block is not None:
                if len(block) == self.image_tokenizer.codes_per_image:
                    blocks.append(block)
                block = None
            elif block is not None and token in codes:
                block.append(token)
            elif token not in codes:
                text_ids.append(token)
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if not blocks or not self.image_tokenizer.has_decoder:
            return text, []
        image_codes = self.image_tokenizer.token_ids_to_codes(torch.tensor(blocks))
        return text, self.image_tokenizer.decode(image_codes)

    # ---- the token cache, parts, templates ----------------------------------------------------------------

    def cache_settings(self) -> dict[str, Any]:
        return {"template": self.template, "label_rule": self.label_rule, "image_token": self.image_token,
                "blocks": [self.boi_token, self.eoi_token], "vq": self._vq_fingerprint,
                "sample_metadata": list(self.sample_metadata)}

    @functools.cached_property
    def _vq_fingerprint(self) -> dict[str, Any]:
        return self.image_tokenizer.fingerprint()

    def lora_scopes(self, on_vision: bool = False, model=None) -> list[str]:
        if on_vision:
            raise ValueError("the VQ image tokenizer of a discrete-token model takes no LoRA (lora.on_vision)")
        return ["model.layers"]

    def use_label_rule(self, rule: str) -> None:
        if rule not in LABEL_RULES:
            raise ValueError(f"labels: {rule!r} is not one of {', '.join(LABEL_RULES)}")
        self.label_rule = rule

    def use_template(self, name: str) -> None:
        from medtune.models.templates import get_template

        self.template = name
        self.tokenizer.chat_template = get_template(name).jinja

    def export_original_format(self, out_dir):
        """Chameleon's own layout (consolidated.pth + params.json), for its and MedMax's inference code."""
        from medtune.models.chameleon import to_chameleon_format

        return to_chameleon_format(self.model, out_dir)

    def write_beside_weights(self, out_dir) -> None:
        super().write_beside_weights(out_dir)
        self.save_decoder(out_dir)

    def save_decoder(self, out_dir) -> None:
        """Hugging Face Chameleon checkpoints have no pixel decoder: write the attached one beside the weights
        (each file complete or absent: written under a temporary name, then renamed)."""
        decoder = getattr(self.image_tokenizer, "decoder", None)
        if decoder is None:
            return
        import dataclasses

        from safetensors.torch import save_file

        out = Path(out_dir)
        weights, settings = out / (DECODER_WEIGHTS + ".partial"), out / (DECODER_CONFIG + ".partial")
        try:
            save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(weights))
            settings.write_text(json.dumps(dataclasses.asdict(decoder.config)), encoding="utf-8")
            (out / DECODER_WEIGHTS).unlink(missing_ok=True)   # loading looks for the weights: none while swapping
            settings.replace(out / DECODER_CONFIG)
            weights.replace(out / DECODER_WEIGHTS)
        finally:
            weights.unlink(missing_ok=True)
            settings.unlink(missing_ok=True)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "label_rule": self.label_rule,
                "codes_per_image": self.image_tokenizer.codes_per_image,
                "codebook_size": self.image_tokenizer.codebook_size}

    # ---- what a person sees -------------------------------------------------------------------------------

    def model_view(self, image):
        """The square crop the VQ encodes (MedMax's preprocessing), at the VQ's resolution."""
        from PIL import Image

        from medtune.models.vq import flatten_alpha_on_white, medmax_crop_box, medmax_resize_size

        rgb = flatten_alpha_on_white(image)
        size = self.image_tokenizer.image_size
        resized = rgb.resize(medmax_resize_size(*rgb.size, size), Image.Resampling.LANCZOS)
        return resized.crop(medmax_crop_box(*resized.size, size))

    def describe(self) -> list[str]:
        config = self.model.config
        vq = self.image_tokenizer
        return [f"llm: chameleon, {config.num_hidden_layers} layers, width {config.hidden_size}",
                f"kind: discrete; image tokens: {vq.codes_per_image} codes per {vq.image_size}-px image "
                f"({vq.grid[0]} x {vq.grid[1]}), code book {vq.codebook_size:,}, between {self.boi_token} and "
                f"{self.eoi_token}; template {self.template}, labels {self.label_rule}",
                f"vocabulary: {len(self.tokenizer):,} tokens"]


def _carried_codes(sample, codes_per_image: int):
    """The raw codes a sample carries (MedMax's ``image_tokens``: one list, or one list per image), or None."""
    from medtune.models.processing import SkipSample

    carried = sample.meta.extra.get(CODES_KEY)
    if carried is None:
        return None
    rows = [carried] if carried and isinstance(carried[0], int) else list(carried)
    if len(rows) != len(sample.images) or any(len(row) != codes_per_image for row in rows):
        raise SkipSample("image codes do not fit", f"{len(rows)} code lists of lengths "
                                                   f"{sorted({len(r) for r in rows})} for {len(sample.images)} "
                                                   f"images of {codes_per_image} codes")
    return rows


class ImageBlockLogitsProcessor:
    """Per row: outside an image, no image codes (and no image start unless images are allowed); inside one,
    exactly ``codes_per_image`` image codes, then the end-of-image token. With images alone the answer is one
    image: it starts at once and the answer ends after it.

    Inside an image the processor picks each code itself, as Chameleon's image decoder does (guided by
    ``streams`` when given, then with ``sampling``'s own temperature and top-p; :mod:`medtune.models.image_guidance`)
    and leaves only that code possible, so the text settings ``generate`` applies afterwards cannot change it."""

    def __init__(self, image_ids: list[int], boi: int, eoi: int, codes_per_image: int, eos: int,
                 modalities: tuple[str, ...], *, sampling=None, streams=None):
        import torch

        from medtune.models.generation import ImageSampling

        self.image_ids, self.image_id_set = torch.tensor(image_ids), set(image_ids)
        self.boi, self.eoi, self.eos, self.codes_per_image = boi, eoi, eos, codes_per_image
        self.allow_images, self.image_only = "image" in modalities, modalities == ("image",)
        self.sampling, self.streams = sampling or ImageSampling(), streams
        self.prompt_length = None
        self.state = None   # per row: codes written in the open image (-1: no image open), images finished

    def __call__(self, input_ids, scores):
        import torch

        from medtune.models.image_guidance import pick_code

        rows = input_ids.shape[0]
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
            self.state = [[-1, 0] for _ in range(rows)]
            if self.streams is not None:
                self.streams.note_prompt(input_ids)
        elif input_ids.shape[1] > self.prompt_length:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                codes, done = self.state[row]
                if token == self.boi:
                    self.state[row] = [0, done]
                elif token == self.eoi and codes >= 0:
                    self.state[row] = [-1, done + 1]
                    if self.streams is not None:
                        self.streams.close(row)
                elif codes >= 0 and token in self.image_id_set:
                    self.state[row][0] = codes + 1
                elif codes >= 0:   # the row ended inside the block (finished, cancelled, a stop string): padding
                    self.state[row] = [-1, done + 1]
                    if self.streams is not None:
                        self.streams.close(row)
        image_ids = self.image_ids.to(scores.device)
        lowest = torch.finfo(scores.dtype).min
        for row, (codes, done) in enumerate(self.state):
            if 0 <= codes < self.codes_per_image:
                logits = scores[row]
                if self.streams is not None:
                    logits = self.streams.guide(row, input_ids[row], logits, codes)
                picked = image_ids[pick_code(logits[image_ids], self.sampling)]
                scores[row] = lowest
                scores[row, picked] = 0
            elif codes == self.codes_per_image:
                scores[row] = lowest
                scores[row, self.eoi] = 0
            elif self.image_only:
                scores[row] = lowest
                scores[row, self.boi if done == 0 else self.eos] = 0
            else:
                scores[row, image_ids] = lowest
                if not self.allow_images:
                    scores[row, self.boi] = lowest
        return scores
