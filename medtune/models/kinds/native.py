"""The native kind: a Hugging Face VLM medtune did not compose (Idefics3 / SmolVLM, llava-hf, Qwen2-VL ...).

Its own processor does everything: it renders the chat template, expands image tokens (their number may
depend on the image, e.g. Idefics3's tiling) and makes the pixel inputs. Labels come from rendering the
conversation's prefixes and counting their tokens: an assistant reply trains the tokens between the prompt
that opens it and the end of its turn. Encoded samples hold processor outputs that depend on the images, so
they are kept in memory rather than in the token cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from medtune.models.kinds.base import NATIVE_TEMPLATE, VLM


@dataclass(kw_only=True)
class NativeVLM(VLM):
    kind: ClassVar[str] = "native"
    part_markers: ClassVar = (
        ("projector", ("multi_modal_projector", "projector", "mm_projector", "merger", "connector")),
        ("vision", ("vision_tower", "visual", "vision_model", "vision_encoder")),
        ("llm", ("language_model", "lm_head", "text_model")),
    )

    @classmethod
    def load(cls, source: str, metadata: dict[str, Any] | None, *, model_kwargs: dict, device: str) -> NativeVLM:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(source, **model_kwargs).to(device).eval()
        processor = AutoProcessor.from_pretrained(source)
        tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None) or "<image>"
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        image_processor = getattr(processor, "image_processor", None)
        return cls(model=model, tokenizer=tokenizer, image_processor=image_processor, processor=processor,
                   template=NATIVE_TEMPLATE, image_token=image_token, image_token_id=int(image_token_id),
                   image_size=processor_image_size(image_processor),
                   sample_metadata=tuple((metadata or {}).get("sample_metadata", ())))

    def encode_sample(self, sample, image_root, *, max_length: int, truncation: str = "text",
                      allowed_roots: Sequence = ()) -> dict[str, Any]:
        from medtune.models.processing import IGNORE_INDEX, SkipSample, load_images, truncate
        from medtune.models.templates import to_chat_messages

        images = load_images(sample.images, image_root, allowed_roots=allowed_roots)
        messages = to_chat_messages(sample)
        text = self.processor.apply_chat_template(messages, tokenize=False)
        batch = self.processor(text=text, images=images or None, return_tensors="pt")
        ids = batch["input_ids"][0].tolist()
        labels = [IGNORE_INDEX] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self._prefix_length(messages[:index], images, add_generation_prompt=True)
                end = min(self._prefix_length(messages[:index + 1], images, add_generation_prompt=False), len(ids))
                labels[start:end] = ids[start:end]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample("no assistant reply")
        ids, labels = truncate(ids, labels, self.image_token_id, max_length=max_length, truncation=truncation)
        out = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
        out.update(input_ids=ids, attention_mask=[1] * len(ids), labels=labels)
        out.setdefault("pixel_values", None)
        carried = self.carried_metadata(sample)
        if carried is not None:
            out["sample_metadata"] = carried
        return out

    def _prefix_length(self, conversation: list[dict], images: list, *, add_generation_prompt: bool) -> int:
        """Tokens of a conversation prefix (with the images its image parts use), as the processor makes them."""
        n_images = sum(1 for m in conversation if not isinstance(m["content"], str)
                       for part in m["content"] if part.get("type") == "image")
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        return len(self.processor(text=text, images=images[:n_images] or None)["input_ids"][0])

    def encode_prompt(self, messages: list[dict], images: list) -> dict[str, Any]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(self.processor(text=text, images=images or None, return_tensors="pt"))

    def write_beside_weights(self, out_dir) -> None:
        # the processor (with its image processor and chat template) is what a native checkpoint loads with
        if self.processor is not None:
            self.processor.save_pretrained(out_dir)
        super().write_beside_weights(out_dir)


def processor_image_size(image_processor) -> int:
    """The square side the processor produces, best effort (native processors may resize dynamically)."""
    for name in ("crop_size", "size"):
        size = getattr(image_processor, name, None)
        if isinstance(size, int):
            return size
        for key in ("height", "shortest_edge", "longest_edge"):
            # transformers 5 keeps sizes as dicts or SizeDict objects (attribute access).
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if value:
                return int(value)
    return 0
