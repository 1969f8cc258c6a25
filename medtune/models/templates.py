"""Chat templates: the prompt formats the seed systems train with, as Python renderers and as Jinja.

Every template exists twice, and a test keeps the two identical for every template:

* ``ChatTemplate.render`` turns OpenAI-style messages into :class:`Segment` s, text pieces flagged
  ``trainable`` (an assistant reply plus the token that ends it) or not (system prompt, user turns, role
  markers). Preprocessing uses the flags to build the labels.
* ``ChatTemplate.jinja`` is the same format as a Jinja ``chat_template``. It is written into the saved
  tokenizer, so ``tokenizer.apply_chat_template`` in plain transformers, vLLM or SGLang builds exactly the
  prompt the model was trained on (template drift between training and serving is a common failure).

Messages are dicts ``{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": ...} |
{"type": "image"}]}``; :func:`to_chat_messages` converts canonical samples. Content parts are joined with a
newline and an image part becomes ``image_token``, which reproduces the ``"<image>\\nquestion"`` layout of
LLaVA-style data while allowing images anywhere.

The families (formats described in our own words; system prompts and separators are those of the seed code
bases, LLaVA / LLaVA-Med, MoE-LLaVA / Med-MoE, XTuner / GMAI-VL, Qwen):

* ``plain``: projector alignment. Each user turn contributes only its image tokens, each assistant turn its
  text followed by a newline; only the caption (and newline) is trained. System prompts and question text are
  ignored, as in LLaVA's stage-1 pre-training.
* ``vicuna``, ``vicuna_v1``, ``phi``, ``stablelm``: a system sentence, then ``USER: ... ASSISTANT: ...`` turns
  separated by a space; each reply ends with the tokenizer's end-of-sequence token. ``vicuna`` (LLaVA's
  ``llava_v1``) speaks of a "human"; ``vicuna_v1`` (LLaVA-Med's ``model_vqa.py`` default), ``phi`` and
  ``stablelm`` (MoE-LLaVA, Med-MoE) of a "user", and the last two start without a BOS token.
* ``llava_llama_2`` and ``mistral_instruct``: ``[INST] ... [/INST]`` instructions with the system prompt in a
  ``<<SYS>>`` block inside the first instruction, replies followed by `` </s>``; Llama-2 repeats BOS before
  every later instruction, Mistral does not. A generation prompt adds nothing: the prompt ends at ``[/INST]``.
* ``chatml``, ``qwen``, ``internlm2``: ``<|im_start|>role\\n ... <|im_end|>\\n`` blocks and a generation
  prompt ``<|im_start|>assistant\\n``; ``qwen`` inserts Qwen's default system prompt when none is given,
  ``internlm2`` starts with BOS.
* ``chameleon``: Chameleon/Anole's supervised format as MedMax trains it: BOS, each user turn followed by the
  end-of-turn token ``<reserved08706>``, each reply followed by EOS (a system message is a first turn of its
  own). The prompt ends at the end-of-turn token, so a generation prompt adds nothing.

BOS/EOS are the tokenizer's own (``bos_token`` / ``eos_token`` in the Jinja context, keyword arguments of
``render``); a template that ignores BOS ignores it in both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

DEFAULT_IMAGE_TOKEN = "<image>"

_VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_MOE_LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                     "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                         "content that the user provides, and assist the user with a variety of tasks using "
                         "natural language.")
_QWEN_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``trainable`` pieces are what the model learns to produce."""

    text: str
    trainable: bool


# --------------------------------------------------------------------------------------------------------------
# Message helpers shared by all renderers

def content_text(content: str | list[dict], image_token: str) -> str:
    """A message's content as text: parts joined by newlines, image parts replaced by ``image_token``."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            pieces.append(image_token)
        elif kind == "text":
            pieces.append(part.get("text") or "")
        else:
            raise ValueError(f"unknown content part type {kind!r} (expected text or image)")
    return "\n".join(pieces)


def count_images(content: str | list[dict]) -> int:
    return 0 if isinstance(content, str) else sum(1 for part in content if part.get("type") == "image")


def _check_roles(messages: list[dict]) -> None:
    for index, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {index}: unknown role {message.get('role')!r} "
                             "(expected system, user or assistant)")


def _split_system(messages: list[dict], image_token: str) -> tuple[str | None, list[dict]]:
    """The leading system message's text (None if absent) and the remaining messages."""
    if messages and messages[0]["role"] == "system":
        return content_text(messages[0]["content"], image_token), messages[1:]
    return None, messages


def to_chat_messages(messages: Iterable[Any]) -> list[dict]:
    """Canonical :class:`~medtune.data.schema.Message` s (or a Sample) -> OpenAI-style message dicts.

    Image references are left out of the dicts (``{"type": "image"}`` marks the place); the images travel
    separately, in order, as ``sample.images``.
    """
    messages = getattr(messages, "messages", messages)
    out = []
    for message in messages:
        parts = [{"type": "image"} if part.type == "image" else {"type": "text", "text": part.text}
                 for part in message.content]
        out.append({"role": message.role, "content": parts})
    return out


# --------------------------------------------------------------------------------------------------------------
# Jinja building blocks. ``image_token`` may be passed to apply_chat_template; it defaults to "<image>".

_JINJA_PRELUDE = (
    "{%- macro render_content(content, image_token) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{ image_token }}{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if image_token is not defined -%}{%- set image_token = '<image>' -%}{%- endif -%}"
    "{%- set bos = bos_token or '' -%}{%- set eos = eos_token or '' -%}"
)

# Splits off a leading system message into ns.system (``default`` when absent) and ns.start (first index).
_JINJA_SYSTEM = (
    "{%- set ns = namespace(system=@DEFAULT@, start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = render_content(messages[0]['content'], image_token) -%}{%- set ns.start = 1 -%}"
    "{%- endif -%}"
)


def _jinja_string(value: str | None) -> str:
    return "none" if value is None else json.dumps(value)


def _jinja_system(default: str | None) -> str:
    return _JINJA_SYSTEM.replace("@DEFAULT@", _jinja_string(default))


# --------------------------------------------------------------------------------------------------------------
# Renderers: (messages, add_generation_prompt, image_token, bos, eos) -> segments

Renderer = Callable[[list[dict], bool, str, str, str], list[Segment]]


def _render_plain(messages, add_generation_prompt, image_token, bos, eos) -> list[Segment]:
    segments = [Segment(bos, False)]
    for message in messages:
        if message["role"] == "user":
            segments.append(Segment(image_token * count_images(message["content"]), False))
        elif message["role"] == "assistant":
            segments.append(Segment(content_text(message["content"], image_token) + "\n", True))
    return segments


_PLAIN_JINJA = _JINJA_PRELUDE + (
    "{{ bos }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' and message['content'] is not string -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ image_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ render_content(message['content'], image_token) + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _user_assistant_renderer(default_system: str, use_bos: bool) -> Renderer:
    """vicuna / phi / stablelm: "SYSTEM USER: q ASSISTANT: a<eos>USER: ..."."""

    def render(messages, add_generation_prompt, image_token, bos, eos) -> list[Segment]:
        system, turns = _split_system(messages, image_token)
        system = default_system if system is None else system
        segments = [Segment((bos if use_bos else "") + (system + " " if system else ""), False)]
        for message in turns:
            text = content_text(message["content"], image_token)
            if message["role"] == "user":
                segments.append(Segment(f"USER: {text} ", False))
            elif message["role"] == "assistant":
                segments += [Segment("ASSISTANT:", False), Segment(f" {text}{eos}", True)]
            else:
                raise ValueError("a system message is only allowed first")
        if add_generation_prompt:
            segments.append(Segment("ASSISTANT:", False))
        return segments

    return render


def _user_assistant_jinja(default_system: str, use_bos: bool) -> str:
    return _JINJA_PRELUDE + _jinja_system(default_system) + (
        ("{{ bos }}" if use_bos else "")
        + "{%- if ns.system -%}{{ ns.system + ' ' }}{%- endif -%}"
        "{%- for message in messages[ns.start:] -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + render_content(message['content'], image_token) + ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT: ' + render_content(message['content'], image_token) + eos }}"
        "{%- else -%}{{ raise_exception('a system message is only allowed first') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def _llama_2_renderer(default_system: str | None, bos_between_turns: bool) -> Renderer:
    """llava_llama_2 / mistral_instruct: "[INST] <<SYS>>..<</SYS>>\\n\\nq [/INST] a </s>"."""

    def render(messages, add_generation_prompt, image_token, bos, eos) -> list[Segment]:
        system, turns = _split_system(messages, image_token)
        system = default_system if system is None else system
        segments = [Segment(bos, False)]
        first_user = True
        for message in turns:
            text = content_text(message["content"], image_token)
            if message["role"] == "user":
                if first_user and system:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
                separator = "" if first_user or not bos_between_turns else bos
                segments.append(Segment(f"{separator}[INST] {text} [/INST]", False))
                first_user = False
            elif message["role"] == "assistant":
                segments.append(Segment(f" {text} {eos}", True))
            else:
                raise ValueError("a system message is only allowed first")
        return segments  # the prompt already ends at "[/INST]": a generation prompt adds nothing

    return render


def _llama_2_jinja(default_system: str | None, bos_between_turns: bool) -> str:
    separator = "bos" if bos_between_turns else "''"
    return _JINJA_PRELUDE + _jinja_system(default_system) + (
        "{{ bos }}{%- set ns.first = true -%}"
        "{%- for message in messages[ns.start:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set text = render_content(message['content'], image_token) -%}"
        "{%- if ns.first and ns.system -%}"
        "{%- set text = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + text -%}{%- endif -%}"
        "{%- if not ns.first -%}{{ " + separator + " }}{%- endif -%}"
        "{{ '[INST] ' + text + ' [/INST]' }}{%- set ns.first = false -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ ' ' + render_content(message['content'], image_token) + ' ' + eos }}"
        "{%- else -%}{{ raise_exception('a system message is only allowed first') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def _chatml_renderer(default_system: str | None, use_bos: bool) -> Renderer:
    """chatml / qwen / internlm2: "<|im_start|>role\\ncontent<|im_end|>\\n"."""

    def render(messages, add_generation_prompt, image_token, bos, eos) -> list[Segment]:
        segments = [Segment(bos if use_bos else "", False)]
        if default_system is not None and not (messages and messages[0]["role"] == "system"):
            segments.append(Segment(f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
        for message in messages:
            text = content_text(message["content"], image_token)
            if message["role"] == "assistant":
                segments += [Segment("<|im_start|>assistant\n", False), Segment(f"{text}<|im_end|>", True),
                             Segment("\n", False)]
            else:
                segments.append(Segment(f"<|im_start|>{message['role']}\n{text}<|im_end|>\n", False))
        if add_generation_prompt:
            segments.append(Segment("<|im_start|>assistant\n", False))
        return segments

    return render


def _chatml_jinja(default_system: str | None, use_bos: bool) -> str:
    default_block = ""
    if default_system is not None:
        default_block = ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
                         "{{ '<|im_start|>system\\n' + " + _jinja_string(default_system) + " + '<|im_end|>\\n' }}"
                         "{%- endif -%}")
    return _JINJA_PRELUDE + ("{{ bos }}" if use_bos else "") + default_block + (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + render_content(message['content'], image_token)"
        " + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


CHAMELEON_END_OF_TURN = "<reserved08706>"


def _render_chameleon(messages, add_generation_prompt, image_token, bos, eos) -> list[Segment]:
    system, turns = _split_system(messages, image_token)
    segments = [Segment(bos + (system + CHAMELEON_END_OF_TURN if system else ""), False)]
    for message in turns:
        text = content_text(message["content"], image_token)
        if message["role"] == "user":
            segments.append(Segment(text + CHAMELEON_END_OF_TURN, False))
        elif message["role"] == "assistant":
            segments.append(Segment(text + eos, True))
        else:
            raise ValueError("a system message is only allowed first")
    return segments


_CHAMELEON_JINJA = _JINJA_PRELUDE + _jinja_system(None) + (
    "{{ bos }}{%- if ns.system -%}{{ ns.system + '" + CHAMELEON_END_OF_TURN + "' }}{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ render_content(message['content'], image_token) + '" + CHAMELEON_END_OF_TURN + "' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ render_content(message['content'], image_token) + eos }}"
    "{%- else -%}{{ raise_exception('a system message is only allowed first') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """A named prompt format: ``render`` for training, ``jinja`` for the saved tokenizer."""

    name: str
    jinja: str
    renderer: Renderer
    default_bos: str = "<s>"
    default_eos: str = "</s>"

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               image_token: str = DEFAULT_IMAGE_TOKEN, *, bos_token: str | None = None,
               eos_token: str | None = None) -> list[Segment]:
        """Segments whose concatenated text equals ``apply_chat_template(..., tokenize=False)``.

        ``bos_token`` / ``eos_token`` default to the template's usual ones; pass the tokenizer's
        (:func:`render_with_tokenizer`) so the text matches the saved checkpoint.
        """
        _check_roles(messages)
        bos = self.default_bos if bos_token is None else bos_token
        eos = self.default_eos if eos_token is None else eos_token
        segments = self.renderer(messages, add_generation_prompt, image_token, bos or "", eos or "")
        return _merge(segments)

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False,
                    image_token: str = DEFAULT_IMAGE_TOKEN, **tokens) -> str:
        return "".join(s.text for s in self.render(messages, add_generation_prompt, image_token, **tokens))


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbours with the same flag (fewer, longer pieces to tokenise)."""
    merged: list[Segment] = []
    for segment in segments:
        if not segment.text:
            continue
        if merged and merged[-1].trainable == segment.trainable:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trainable)
        else:
            merged.append(segment)
    return merged


def _make(name: str, renderer: Renderer, jinja: str, **defaults) -> ChatTemplate:
    return ChatTemplate(name=name, jinja=jinja, renderer=renderer, **defaults)


_TEMPLATES = {
    "plain": _make("plain", _render_plain, _PLAIN_JINJA),
    "vicuna": _make("vicuna", _user_assistant_renderer(_VICUNA_SYSTEM, True), _user_assistant_jinja(_VICUNA_SYSTEM, True)),
    "vicuna_v1": _make("vicuna_v1", _user_assistant_renderer(_MOE_LLAVA_SYSTEM, True),
                       _user_assistant_jinja(_MOE_LLAVA_SYSTEM, True)),
    "phi": _make("phi", _user_assistant_renderer(_MOE_LLAVA_SYSTEM, False),
                 _user_assistant_jinja(_MOE_LLAVA_SYSTEM, False), default_eos="<|endoftext|>"),
    "stablelm": _make("stablelm", _user_assistant_renderer(_MOE_LLAVA_SYSTEM, False),
                      _user_assistant_jinja(_MOE_LLAVA_SYSTEM, False), default_eos="<|endoftext|>"),
    "llava_llama_2": _make("llava_llama_2", _llama_2_renderer(_LLAVA_LLAMA_2_SYSTEM, True),
                           _llama_2_jinja(_LLAVA_LLAMA_2_SYSTEM, True)),
    "mistral_instruct": _make("mistral_instruct", _llama_2_renderer(None, False), _llama_2_jinja(None, False)),
    "chatml": _make("chatml", _chatml_renderer(None, False), _chatml_jinja(None, False), default_eos="<|im_end|>"),
    "qwen": _make("qwen", _chatml_renderer(_QWEN_SYSTEM, False), _chatml_jinja(_QWEN_SYSTEM, False),
                  default_eos="<|im_end|>"),
    "internlm2": _make("internlm2", _chatml_renderer(None, True), _chatml_jinja(None, True),
                       default_eos="<|im_end|>"),
    "chameleon": _make("chameleon", _render_chameleon, _CHAMELEON_JINJA),
}

TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)


def stop_token_ids(name: str, tokenizer) -> list[int]:
    """The ids that end an answer in template ``name``: the tokenizer's EOS, and the template's end of turn where
    it is one token of this vocabulary (chatml's ``<|im_end|>``, which an offline or Llama tokenizer's EOS is not).
    Generation must stop at both: a model that ends its turn and is asked to go on writes another answer."""
    ids = {tokenizer.eos_token_id}
    if name in _TEMPLATES:
        end = tokenizer.convert_tokens_to_ids(_TEMPLATES[name].default_eos)
        if end is not None and end != tokenizer.unk_token_id:
            ids.add(end)
    return sorted(i for i in ids if i is not None)


def get_template(name: str) -> ChatTemplate:
    """The template called ``name`` (one of :data:`TEMPLATE_NAMES`)."""
    if name not in _TEMPLATES:
        raise ValueError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATE_NAMES)})")
    return _TEMPLATES[name]


def render_with_tokenizer(template: ChatTemplate, messages: list[dict], tokenizer, *,
                          add_generation_prompt: bool = False, image_token: str = DEFAULT_IMAGE_TOKEN) -> list[Segment]:
    """Render with the tokenizer's own BOS/EOS strings, as ``tokenizer.apply_chat_template`` does."""
    return template.render(messages, add_generation_prompt, image_token,
                           bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
