"""Chat templates: the prompt formats the seed systems train with, each written once, as Jinja.

* ``ChatTemplate.jinja`` is a Jinja ``chat_template`` whose ``{% generation %}`` blocks hold what the model learns
  to write (an assistant reply plus the token that ends it). It is written into the saved tokenizer, so
  ``tokenizer.apply_chat_template`` in plain transformers, vLLM or SGLang builds exactly the prompt the model was
  trained on (template drift between training and serving is a common failure), and
  ``return_assistant_tokens_mask=True`` gives the trained tokens there too.
* ``ChatTemplate.render`` renders it with transformers' own renderer into :class:`Segment` s, text pieces flagged
  ``trainable`` (inside a generation block) or not (system prompt, user turns, role markers). Preprocessing
  tokenises the pieces and uses the flags to build the labels.

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
from typing import Any, Iterable

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
# Message helpers

def _check_messages(messages: list[dict]) -> None:
    """Roles, and content that is a string or a list of text (with a string) and image parts."""
    for index, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {index}: unknown role {message.get('role')!r} "
                             "(expected system, user or assistant)")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"message {index}: content must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image" or (kind == "text" and isinstance(part.get("text"), str)):
                continue
            raise ValueError(f"message {index}: content parts must be {{type: text, text: ...}} or "
                             f"{{type: image}}, got {part!r}"[:200])


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
# The templates. What a model learns to write sits inside {% generation %} blocks.

_PLAIN_JINJA = _JINJA_PRELUDE + (
    "{{ bos }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' and message['content'] is not string -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ image_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ render_content(message['content'], image_token) + '\\n' }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _user_assistant_jinja(default_system: str, use_bos: bool) -> str:
    """vicuna / phi / stablelm: "SYSTEM USER: q ASSISTANT: a<eos>USER: ..."."""
    return _JINJA_PRELUDE + _jinja_system(default_system) + (
        ("{{ bos }}" if use_bos else "")
        + "{%- if ns.system -%}{{ ns.system + ' ' }}{%- endif -%}"
        "{%- for message in messages[ns.start:] -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + render_content(message['content'], image_token) + ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT:' }}"
        "{%- generation -%}{{ ' ' + render_content(message['content'], image_token) + eos }}{%- endgeneration -%}"
        "{%- else -%}{{ raise_exception('a system message is only allowed first') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def _llama_2_jinja(default_system: str | None, bos_between_turns: bool) -> str:
    """llava_llama_2 / mistral_instruct: "[INST] <<SYS>>..<</SYS>>\\n\\nq [/INST] a </s>"; the prompt already
    ends at "[/INST]", so a generation prompt adds nothing."""
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
        "{%- generation -%}{{ ' ' + render_content(message['content'], image_token) + ' ' + eos }}"
        "{%- endgeneration -%}"
        "{%- else -%}{{ raise_exception('a system message is only allowed first') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def _chatml_jinja(default_system: str | None, use_bos: bool) -> str:
    """chatml / qwen / internlm2: "<|im_start|>role\\ncontent<|im_end|>\\n"."""
    default_block = ""
    if default_system is not None:
        default_block = ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
                         "{{ '<|im_start|>system\\n' + " + _jinja_string(default_system) + " + '<|im_end|>\\n' }}"
                         "{%- endif -%}")
    return _JINJA_PRELUDE + ("{{ bos }}" if use_bos else "") + default_block + (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
        "{%- generation -%}{{ render_content(message['content'], image_token) + '<|im_end|>' }}{%- endgeneration -%}"
        "{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + render_content(message['content'], image_token)"
        " + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


CHAMELEON_END_OF_TURN = "<reserved08706>"

_CHAMELEON_JINJA = _JINJA_PRELUDE + _jinja_system(None) + (
    "{{ bos }}{%- if ns.system -%}{{ ns.system + '" + CHAMELEON_END_OF_TURN + "' }}{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ render_content(message['content'], image_token) + '" + CHAMELEON_END_OF_TURN + "' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ render_content(message['content'], image_token) + eos }}{%- endgeneration -%}"
    "{%- else -%}{{ raise_exception('a system message is only allowed first') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """A named prompt format, written once as a Jinja ``chat_template`` with ``{% generation %}`` blocks."""

    name: str
    jinja: str
    default_bos: str = "<s>"
    default_eos: str = "</s>"

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               image_token: str = DEFAULT_IMAGE_TOKEN, *, bos_token: str | None = None,
               eos_token: str | None = None) -> list[Segment]:
        """Segments whose concatenated text equals ``apply_chat_template(..., tokenize=False)``: the Jinja
        rendered by transformers' own renderer, cut where its ``{% generation %}`` blocks start and end.

        ``bos_token`` / ``eos_token`` default to the template's usual ones; pass the tokenizer's
        (:func:`render_with_tokenizer`) so the text matches the saved checkpoint.
        """
        from jinja2.exceptions import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        _check_messages(messages)
        bos = self.default_bos if bos_token is None else bos_token
        eos = self.default_eos if eos_token is None else eos_token
        try:
            texts, spans = render_jinja_template([messages], chat_template=self.jinja, return_assistant_tokens_mask=True,
                                                 add_generation_prompt=add_generation_prompt, image_token=image_token,
                                                 bos_token=bos or "", eos_token=eos or "")
        except TemplateError as error:
            raise ValueError(str(error)) from None
        text, segments, at = texts[0], [], 0
        for start, end in spans[0]:
            segments += [Segment(text[at:start], False), Segment(text[start:end], True)]
            at = end
        segments.append(Segment(text[at:], False))
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


_TEMPLATES = {template.name: template for template in (
    ChatTemplate("plain", _PLAIN_JINJA),
    ChatTemplate("vicuna", _user_assistant_jinja(_VICUNA_SYSTEM, True)),
    ChatTemplate("vicuna_v1", _user_assistant_jinja(_MOE_LLAVA_SYSTEM, True)),
    ChatTemplate("phi", _user_assistant_jinja(_MOE_LLAVA_SYSTEM, False), default_eos="<|endoftext|>"),
    ChatTemplate("stablelm", _user_assistant_jinja(_MOE_LLAVA_SYSTEM, False), default_eos="<|endoftext|>"),
    ChatTemplate("llava_llama_2", _llama_2_jinja(_LLAVA_LLAMA_2_SYSTEM, True)),
    ChatTemplate("mistral_instruct", _llama_2_jinja(None, False)),
    ChatTemplate("chatml", _chatml_jinja(None, False), default_eos="<|im_end|>"),
    ChatTemplate("qwen", _chatml_jinja(_QWEN_SYSTEM, False), default_eos="<|im_end|>"),
    ChatTemplate("internlm2", _chatml_jinja(None, True), default_eos="<|im_end|>"),
    ChatTemplate("chameleon", _CHAMELEON_JINJA),
)}

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
