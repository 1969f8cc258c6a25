"""Native Hugging Face VLMs (not written by medtune) load through load_vlm with their own processor and
chat template (template "native"), and give the same logits as the model that was saved."""
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from medtune.models.build import build_vlm, load_vlm  # noqa: E402
from medtune.models.presets import tiny_spec  # noqa: E402

torch.set_num_threads(1)

IDEFICS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{% if m['content'] is string %}{{ m['content'] }}"
                    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
                    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
                    "{% if add_generation_prompt %}Assistant:{% endif %}")
CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the lung normal?"}]}]


@pytest.fixture(scope="module")
def tiny_idefics3(tmp_path_factory):
    """A 1-layer Idefics3 (SmolVLM architecture) with its processor, saved as a plain HF checkpoint."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from medtune.models.tokenizer import offline_tokenizer

    tokenizer = offline_tokenizer()
    tokenizer.add_tokens(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], special_tokens=True)
    torch.manual_seed(0)
    config = Idefics3Config(
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = Idefics3ForConditionalGeneration(config).eval()
    # (32 / 8)^2 patches merged 2x2 by pixel shuffle: 4 image tokens per image.
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=IDEFICS_TEMPLATE)
    path = tmp_path_factory.mktemp("idefics3")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model


def test_native_idefics3_loads_with_its_own_processor_and_template(tiny_idefics3):
    path, original = tiny_idefics3
    vlm = load_vlm(path)
    assert vlm.kind == "native" and vlm.template == "native" and vlm.cache_settings() is None
    assert type(vlm.processor).__name__ == "Idefics3Processor"
    assert vlm.image_token == "<image>" and vlm.image_token_id == original.config.image_token_id
    assert vlm.tokenizer.chat_template == IDEFICS_TEMPLATE
    prompt = vlm.processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    inputs = vlm.processor(images=[[Image.new("RGB", (40, 32), "gray")]], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == vlm.image_token_id).sum()) == 4
    with torch.no_grad():
        assert torch.equal(vlm.model(**inputs).logits, original(**inputs).logits)


def test_llava_checkpoint_without_medtune_metadata_is_native(tmp_path):
    """A llava-hf style checkpoint (model + LlavaProcessor, no medtune.json) is used as a native VLM."""
    built = build_vlm(tiny_spec())
    built.model.save_pretrained(tmp_path)
    built.processor.save_pretrained(tmp_path)
    vlm = load_vlm(tmp_path)
    assert vlm.kind == "native" and type(vlm.processor).__name__ == "LlavaProcessor"
    assert vlm.image_token_id == built.image_token_id and vlm.image_size == 32
    inputs = vlm.processor(images=Image.new("RGB", (32, 32)), text="USER: <image> hi", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(vlm.model(**inputs).logits, built.model(**inputs).logits)
