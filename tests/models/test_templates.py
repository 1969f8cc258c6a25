"""Every chat template: medtune's renderer == the saved tokenizer's apply_chat_template, text and token ids."""
import pytest

from medtune.data.schema import ImageRef, Message, Part, Sample
from medtune.models.processing import tokenize_segments
from medtune.models.templates import TEMPLATE_NAMES, get_template, render_with_tokenizer, to_chat_messages

SPECIAL = ["<s>", "</s>", "<pad>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CORPUS = ["What is shown in the image? The chest x-ray shows a left lower lobe opacity.",
          "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> system user assistant",
          "Is there a fracture? No. Yes, the femur. Describe the finding in detail."] * 5


def _tokenizer(tmp_path, template_name, *, bos="<s>", eos="</s>"):
    """A byte-level BPE tokenizer trained offline, saved with the template and reloaded from disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                        additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = get_template(template_name).jinja
    tokenizer.save_pretrained(tmp_path / template_name)
    return AutoTokenizer.from_pretrained(tmp_path / template_name)


def _text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}
CONVERSATIONS = {
    "single_image_first": [
        {"role": "user", "content": [IMAGE, _text("What is shown in the image?")]},
        {"role": "assistant", "content": "The chest x-ray shows a left lower lobe opacity."},
    ],
    "system_multi_turn_two_images": [
        {"role": "system", "content": "You are a careful radiology assistant."},
        {"role": "user", "content": [_text("Is there a fracture?"), IMAGE]},
        {"role": "assistant", "content": [_text("No.")]},
        {"role": "user", "content": [_text("Compare with"), IMAGE, _text("in detail.")]},
        {"role": "assistant", "content": "Yes, the femur."},
    ],
    "text_only_string_content": [
        {"role": "user", "content": "Describe the finding in detail."},
        {"role": "assistant", "content": "The femur."},
        {"role": "user", "content": "Is there a fracture?"},
    ],
    "empty_system_two_images_one_turn": [
        {"role": "system", "content": ""},
        {"role": "user", "content": [IMAGE, IMAGE, _text("What changed?")]},
        {"role": "assistant", "content": "Nothing."},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_render_matches_saved_tokenizer(tmp_path, name, conversation, add_generation_prompt):
    eos = "<|endoftext|>" if name in ("phi", "stablelm") else "</s>"
    tokenizer = _tokenizer(tmp_path, name, eos=eos)
    messages = CONVERSATIONS[conversation]
    segments = render_with_tokenizer(get_template(name), messages, tokenizer,
                                     add_generation_prompt=add_generation_prompt)
    expected_text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
    assert "".join(s.text for s in segments) == expected_text
    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt)["input_ids"]
    ids, trainable = tokenize_segments(segments, tokenizer)
    assert ids == expected_ids
    # images survive as one atomic token each (never merged into text pieces)
    n_images = sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p == IMAGE)
    if name != "plain" or conversation != "text_only_string_content":
        assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == n_images


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_trainable_tokens_are_exactly_the_replies(tmp_path, name):
    eos = "<|endoftext|>" if name in ("phi", "stablelm") else "</s>"
    tokenizer = _tokenizer(tmp_path, name, eos=eos)
    messages = CONVERSATIONS["system_multi_turn_two_images"]
    ids, trainable = tokenize_segments(render_with_tokenizer(get_template(name), messages, tokenizer), tokenizer)
    learned = tokenizer.decode([i for i, t in zip(ids, trainable) if t])
    end = {"plain": "\n", "chatml": "<|im_end|>", "qwen": "<|im_end|>", "internlm2": "<|im_end|>"}.get(name, eos)
    replies = ["No.", "Yes, the femur."]
    if name in ("llava_llama_2", "mistral_instruct"):
        expected = "".join(f" {r} {end}" for r in replies)
    elif name in ("vicuna", "vicuna_v1", "phi", "stablelm"):
        expected = "".join(f" {r}{end}" for r in replies)
    else:
        expected = "".join(f"{r}{end}" for r in replies)
    assert learned == expected
    assert not trainable[0]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_the_saved_template_marks_the_trained_tokens_for_plain_transformers_too(tmp_path, name):
    """One source: the saved chat template's generation blocks give apply_chat_template's assistant mask, which
    equals the tokens medtune trains."""
    eos = "<|endoftext|>" if name in ("phi", "stablelm") else "</s>"
    tokenizer = _tokenizer(tmp_path, name, eos=eos)
    messages = CONVERSATIONS["system_multi_turn_two_images"]
    ids, trainable = tokenize_segments(render_with_tokenizer(get_template(name), messages, tokenizer), tokenizer)
    plain = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert plain["input_ids"] == ids
    assert plain["assistant_masks"] == [int(t) for t in trainable] and any(trainable)


def test_qwen_inserts_default_system_and_chatml_does_not():
    messages = [{"role": "user", "content": "hi"}]
    assert get_template("qwen").render_text(messages).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert get_template("chatml").render_text(messages) == "<|im_start|>user\nhi<|im_end|>\n"


def test_unknown_template_and_role_are_refused():
    with pytest.raises(ValueError, match="unknown chat template 'llama9'"):
        get_template("llama9")
    with pytest.raises(ValueError, match="message 0: unknown role 'tool'"):
        get_template("vicuna").render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="message 0: content parts must be"):
        get_template("chatml").render([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ValueError, match="message 0: content parts must be"):
        get_template("chatml").render([{"role": "user", "content": [{"type": "text", "text": None}]}])


def test_canonical_messages_convert_with_images_in_place():
    sample = Sample(id="1", messages=[
        Message("user", (Part.of_text("Look:"), Part.of_image(ImageRef("a.png")), Part.of_text("what?"))),
        Message("assistant", (Part.of_text("A lung."),)),
    ])
    assert to_chat_messages(sample) == [
        {"role": "user", "content": [_text("Look:"), IMAGE, _text("what?")]},
        {"role": "assistant", "content": [_text("A lung.")]},
    ]
    assert get_template("vicuna").render_text(to_chat_messages(sample), bos_token="") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: Look:\n<image>\nwhat? ASSISTANT: A lung.</s>")


@pytest.mark.parametrize("name", ["vicuna", "llava_llama_2", "internlm2", "plain"])
def test_tokenizer_without_bos_renders_none_in_both(tmp_path, name):
    """Qwen-like tokenizers have no BOS token: the Jinja and the renderer both leave it out."""
    tokenizer = _tokenizer(tmp_path, name, bos=None)
    assert tokenizer.bos_token is None
    messages = CONVERSATIONS["system_multi_turn_two_images"]
    text = "".join(s.text for s in render_with_tokenizer(get_template(name), messages, tokenizer))
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<s>" not in text


@pytest.mark.parametrize("name", ["vicuna", "llava_llama_2"])
def test_a_system_message_after_the_start_is_refused_by_both(tmp_path, name):
    from jinja2.exceptions import TemplateError

    tokenizer = _tokenizer(tmp_path, name)
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match="a system message is only allowed first"):
        get_template(name).render(messages)
    with pytest.raises(TemplateError, match="a system message is only allowed first"):
        tokenizer.apply_chat_template(messages, tokenize=False)
