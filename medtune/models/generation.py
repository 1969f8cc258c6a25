"""Text generation from a loaded VLM: one engine for the terminal, the web demo, the API and evaluation.

Design choices:

* Prompts are built by the model's kind (``vlm.encode_prompt``: its own chat template and image processing),
  so serving and evaluating a checkpoint build exactly the prompt it was trained on.
* Batches are padded on the LEFT by hand: every row then ends at the same position, so the first generated
  token of each row sits right after its own prompt, and ``generate`` derives position ids from the attention
  mask. A batched greedy run therefore returns what one-by-one runs return (tested).
* ``temperature == 0`` means greedy decoding (deterministic); otherwise nucleus sampling, made reproducible by
  ``GenerationSettings.seed``, which seeds a forked RNG so the caller's global random state is left alone.
  Without a seed, sampling draws from the global RNG, so asking again gives a new answer.
* Stop strings end a row through ``generate(stop_strings=...)`` (transformers' StopStringCriteria, which
  matches them on token strings without decoding every row at every step) and are cut from the returned text,
  as OpenAI's ``stop`` does. ``stream`` reads transformers' ``TextIteratorStreamer`` and holds back text that
  could be the start of a stop string, so a client never sees part of one.
* An answer starts at its first non-space character: byte-level tokenizers decode the first token after
  "ASSISTANT:" with the space it carries (" No"), which no user asked for and exact-match scoring would count.
  Streams drop it the same way, so the deltas still join to the returned text.
* One lock per Generator: the model runs one ``generate`` at a time; concurrent callers (web sessions, API
  workers) queue on it instead of fighting for the same cores. The API batches requests on top of this.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from medtune.models.collate import collate_prompts, flat_ids
from medtune.models.templates import stop_token_ids

if TYPE_CHECKING:  # heavy imports stay inside functions (this module is imported by CLI modules)
    from PIL import Image

    from medtune.models.kinds import VLM

Conversation = list[dict]


@dataclass(frozen=True)
class ImageSampling:
    """How image codes are picked. Defaults are Chameleon's (``Options.Image``): guidance 3.0 on the text and 1.2
    on the images, temperature 0.7, top-p 0.9. ``temperature == 0`` takes the most likely code."""

    guidance_text: float = 3.0
    guidance_image: float = 1.2
    temperature: float = 0.7
    top_p: float = 0.9

    def __post_init__(self):
        for name in ("guidance_text", "guidance_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 20:
                raise ValueError(f"image {name.replace('_', ' ')} scale must be between 0 and 20, got {value!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"image temperature must be between 0 and 2, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"image top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def guided(self) -> bool:
        return (self.guidance_text, self.guidance_image) != (1, 1)

    def to_dict(self) -> dict[str, float]:
        return {"guidance_text": self.guidance_text, "guidance_image": self.guidance_image,
                "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    modalities: tuple[str, ...] = ("text",)
    """What the answer may hold: ``text``; ``image`` alone (the answer is one image); or both (the model decides
    where an image goes). Images need a model that writes image tokens and can decode them."""
    image: ImageSampling = ImageSampling()
    """How the codes of an image answer are picked (classifier-free guidance and their own sampling, as
    Chameleon's image decoder does; :mod:`medtune.models.image_guidance`)."""

    def __post_init__(self):
        if isinstance(self.stop, str):  # a single stop string is a common way to write it
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        modalities = (self.modalities,) if isinstance(self.modalities, str) else tuple(self.modalities)
        if not modalities or set(modalities) - {"text", "image"} or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be text, image or both, got {self.modalities!r}")
        object.__setattr__(self, "modalities", tuple(m for m in ("text", "image") if m in modalities))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def samples(self) -> bool:
        """Whether anything is drawn at random: the text, or the codes of an image answer."""
        return not self.greedy or ("image" in self.modalities and self.image.temperature > 0)

    def to_dict(self) -> dict:
        """JSON form, recorded with every prediction (the seed only when sampling is seeded)."""
        out = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
               "stop": list(self.stop)}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.modalities != ("text",):
            out["modalities"] = list(self.modalities)
        if "image" in self.modalities:
            out["image"] = self.image.to_dict()
        return out


@dataclass
class Completion:
    """One generated answer with what an API reports about it."""

    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    images: list = field(default_factory=list)
    """Images the answer holds (PIL), in order, when the model writes images."""


@dataclass
class TextStream:
    """An iterator of text deltas; ``completion`` is filled in once the iteration has finished."""

    deltas: Iterator[str]
    completion: Completion | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        return self.deltas

    def __next__(self) -> str:
        return next(self.deltas)


class Generator:
    """Generates answers for OpenAI-style conversations with a loaded :class:`VLM`.

    ``conversations`` hold message dicts ``{role, content: str | [{type: text, text} | {type: image}]}``;
    ``images[i]`` lists the PIL images of conversation ``i`` in the order of its image parts.
    """

    def __init__(self, vlm: "VLM"):
        self.vlm = vlm
        self.tokenizer = vlm.tokenizer
        self._lock = threading.Lock()
        self.pad_token_id = padding_id(self.tokenizer)
        self.eos_token_ids = _eos_token_ids(vlm)

    # -- public API -------------------------------------------------------------------------------------------

    def generate(self, conversations: Sequence[Conversation], images: Sequence[Sequence["Image.Image"]],
                 settings: GenerationSettings = GenerationSettings()) -> list[str]:
        """Answers for a batch of conversations (one ``generate`` call, left padded)."""
        return [c.text for c in self.complete(conversations, images, settings)]

    def complete(self, conversations: Sequence[Conversation], images: Sequence[Sequence["Image.Image"]],
                 settings: GenerationSettings = GenerationSettings(),
                 cancel: threading.Event | None = None, *, cancel_rows: Sequence[threading.Event] | None = None,
                 prompts: Sequence[dict] | None = None) -> list[Completion]:
        """Like :meth:`generate`, with finish reasons and token counts. Once ``cancel`` is set (a server
        shutting down), every row ends at its next token; once ``cancel_rows[i]`` is set (its client has gone),
        row ``i`` does. ``prompts``: the rows already encoded by :meth:`encode` (then ``images`` is not read)."""
        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        if not conversations:
            return []
        batch = self._encode_batch(conversations, images, prompts)
        prompt_length = batch["input_ids"].shape[1]
        with self._lock:
            output = self._run_generate(batch, settings, cancel=_Cancelled(cancel, cancel_rows)
                                        if cancel is not None or cancel_rows else None)
        return [self._completion(row[prompt_length:], int(mask.sum()), settings)
                for row, mask in zip(output, batch["attention_mask"])]

    def stream(self, conversation: Conversation, images: Sequence["Image.Image"],
               settings: GenerationSettings = GenerationSettings(), *, prompt: dict | None = None) -> TextStream:
        """Text deltas of one answer as it is generated; joined they equal :meth:`generate`'s answer.
        ``prompt``: the conversation already encoded by :meth:`encode`."""
        batch = self._encode_batch([conversation], [images], None if prompt is None else [prompt])
        stream = TextStream(deltas=iter(()))
        stream.deltas = self._stream_deltas(batch, settings, stream)
        return stream

    def encode(self, conversation: Conversation, images: Sequence["Image.Image"]) -> dict[str, Any]:
        """One prompt's tensors ([1, L] ids, the images' pixels), as :meth:`complete` batches them; a server
        encodes once on arrival to check the prompt's length and keeps these instead of the decoded images."""
        return self.vlm.encode_prompt(list(conversation), list(images))

    def sample(self, prompts: Sequence[dict], settings: GenerationSettings) -> tuple[dict[str, Any], Any]:
        """(the left-padded batch, its output ids [B, prompt + new]) of one ``generate`` call over encoded prompts
        (:meth:`encode`), for training on the model's own answers (the ids are ordinary tensors, usable in a
        forward pass with gradients). Image placeholder tokens are never sampled: an answer holding one could not
        be fed back with its prompt's images."""
        batch = self._encode_batch(None, None, prompts)
        suppressed = self.vlm.placeholder_token_ids()
        with self._lock:
            output = self._run_generate(batch, settings, extra={"suppress_tokens": suppressed} if suppressed else None)
        return batch, output.clone()

    def _encode_batch(self, conversations, images, prompts: Sequence[dict] | None = None) -> dict[str, Any]:
        if prompts is None:
            prompts = [self.encode(conv, imgs) for conv, imgs in zip(conversations, images)]
        return collate_prompts(list(prompts), self.pad_token_id, self.vlm.model)

    @property
    def context_length(self) -> int | None:
        """Most tokens the model attends to (prompt and answer together), or None when its config does not say."""
        config = self.vlm.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text_config, "max_position_embeddings", None)

    # -- decoding ---------------------------------------------------------------------------------------------

    def _run_generate(self, batch: dict, settings: GenerationSettings, streamer=None, cancel=None, extra=None):
        import torch
        from transformers import StoppingCriteriaList

        criteria = StoppingCriteriaList([cancel] if cancel is not None else [])
        kwargs = dict(batch, max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
                      pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids,
                      stopping_criteria=criteria, streamer=streamer, use_cache=True,
                      **self.vlm.generation_kwargs(settings), **(extra or {}))
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        if settings.greedy:
            # generation_config defaults from a checkpoint (e.g. temperature=0.9) must not leak into greedy runs
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        if settings.seed is None:  # unseeded sampling advances the global RNG: each call draws anew
            with torch.inference_mode():
                return self.vlm.model.generate(**kwargs)
        device = self.vlm.model.device
        rng_devices = [device] if device.type == "cuda" else []  # sampling on a GPU draws from its RNG
        with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(settings.seed)
            return self.vlm.model.generate(**kwargs)

    def _completion(self, new_tokens, prompt_tokens: int, settings: GenerationSettings) -> Completion:
        ids = new_tokens.tolist()
        ended = next((i for i, t in enumerate(ids) if t in self.eos_token_ids), None)
        if ended is not None:
            ids = ids[: ended + 1]
        else:  # a row stopped early (stop string) while others ran on is filled with padding
            while ids and ids[-1] == self.pad_token_id:
                ids.pop()
        text, images = self.vlm.decode_output(ids)
        text = text.lstrip()
        cut = _cut_at_stop(text, settings.stop)
        stopped = ended is not None or cut is not None
        return Completion(text=text if cut is None else text[:cut], finish_reason="stop" if stopped else "length",
                          prompt_tokens=prompt_tokens, completion_tokens=len(ids), images=images)

    def _stream_deltas(self, batch: dict, settings: GenerationSettings, stream: TextStream) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        output: list = []
        failure: list[BaseException] = []

        def work():
            try:
                with self._lock:
                    output.append(self._run_generate(batch, settings, streamer=streamer,
                                                     cancel=_Cancelled(cancel)))
            except BaseException as error:  # re-raised in the consumer, which owns the error reporting
                failure.append(error)
                streamer.end()  # generate raised before ending the stream: end it, or the consumer waits forever

        thread = threading.Thread(target=work, name="medtune-stream", daemon=True)
        thread.start()
        text, sent = "", 0
        try:
            for piece in streamer:
                text = (text + piece).lstrip()   # the answer's leading space, as _completion drops it
                if _cut_at_stop(text, settings.stop) is not None:
                    break
                safe = _safe_prefix_length(text, settings.stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        finally:
            cancel.set()  # a consumer that stops early (client gone) ends the generation too
            thread.join()
        if failure:
            raise failure[0]
        prompt_length = batch["input_ids"].shape[1]
        final = self._completion(output[0][0, prompt_length:], int(batch["attention_mask"].sum()), settings)
        stream.completion = final
        if len(final.text) > sent:
            yield final.text[sent:]


# -- helpers ------------------------------------------------------------------------------------------------

def padding_id(tokenizer) -> int:
    """The id prompts are left-padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id



def _eos_token_ids(vlm) -> list[int]:
    """End-of-turn ids: the checkpoint's generation config (it may list a template's end token), EOS, and the end
    of turn of the medtune template the model was trained with (checkpoints saved before their generation config
    listed it, e.g. a chatml model whose tokenizer's EOS is ``</s>``)."""
    configured = getattr(getattr(vlm.model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids += stop_token_ids(getattr(vlm, "template", None) or "", vlm.tokenizer)
    return sorted({i for i in ids if i is not None})


def _cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text`` (None when there is none)."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix_length(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` can be shown: not a trailing partial stop string, nor an unfinished character."""
    safe = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD for now
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:size]):
                safe = min(safe, len(text) - size)
                break
    return safe


class _Cancelled:
    """Stopping criterion: every row ends once ``everyone`` is set (a server stopping, a stream's consumer gone);
    row ``i`` ends once ``rows[i]`` is (its client has gone), the others go on."""

    def __init__(self, everyone: threading.Event | None, rows: Sequence[threading.Event] | None = None):
        self.everyone, self.rows = everyone, rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.everyone is not None and self.everyone.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = [event.is_set() for event in self.rows] if self.rows else [False] * input_ids.shape[0]
        return torch.tensor(rows, dtype=torch.bool, device=input_ids.device)
