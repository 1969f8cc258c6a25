"""Generator: batched (left-padded) greedy decoding equals one-by-one decoding; streams, stop strings, end of
turn, max_new_tokens and seeded sampling behave as documented. Tiny random models (presets.tiny_spec)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from medtune.models.generation import GenerationSettings, Generator  # noqa: E402


def _image(seed: int, size=(40, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def vlm():
    from medtune.models import presets
    from medtune.models.build import build_vlm

    torch.set_num_threads(1)
    return build_vlm(presets.tiny_spec())


@pytest.fixture(scope="module")
def generator(vlm):
    return Generator(vlm)


# Prompts of clearly different lengths, with and without images, so the batch needs real left padding.
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "text", "text": "Is there a fracture of the left femur in this "
                                                          "radiograph, and if so where exactly?"},
                                  {"type": "image"}]},
     {"role": "assistant", "content": "Yes."},
     {"role": "user", "content": "Where?"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which organ?"}]}],
]
IMAGES = [[_image(0)], [], [_image(1, (32, 64))], [_image(2, (64, 48))]]


def test_batched_greedy_equals_one_by_one(generator):
    settings = GenerationSettings(max_new_tokens=10)
    batched = generator.complete(CONVERSATIONS, IMAGES, settings)
    one_by_one = [generator.complete([c], [i], settings)[0] for c, i in zip(CONVERSATIONS, IMAGES)]
    assert len({c.prompt_tokens for c in batched}) == len(batched), "prompts must differ in length"
    assert [c.text for c in batched] == [c.text for c in one_by_one]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in one_by_one]
    assert all(c.text for c in batched)


@pytest.mark.parametrize("projector", ["linear", "attn_pool+mlp2x_gelu"])
def test_batched_greedy_equals_one_by_one_for_medtune_projectors(projector):
    """The medtune_vlm class (non-Llava projectors) pads and generates the same way."""
    from medtune.models import presets
    from medtune.models.build import build_vlm

    generator = Generator(build_vlm(presets.tiny_spec(projector=projector)))
    settings = GenerationSettings(max_new_tokens=6)
    batched = generator.generate(CONVERSATIONS, IMAGES, settings)
    assert batched == [generator.generate([c], [i], settings)[0] for c, i in zip(CONVERSATIONS, IMAGES)]


def test_batched_greedy_equals_one_by_one_in_reverse_order(generator):
    """The same prompt gets the same answer whatever else is in the batch and wherever it sits."""
    settings = GenerationSettings(max_new_tokens=8)
    forward = generator.generate(CONVERSATIONS, IMAGES, settings)
    backward = generator.generate(CONVERSATIONS[::-1], IMAGES[::-1], settings)
    assert forward == backward[::-1]


def test_stream_joins_to_generate(generator):
    settings = GenerationSettings(max_new_tokens=12)
    for conversation, images in zip(CONVERSATIONS, IMAGES):
        expected = generator.complete([conversation], [images], settings)[0]
        stream = generator.stream(conversation, images, settings)
        deltas = list(stream)
        assert "".join(deltas) == expected.text
        assert len(deltas) > 1  # streamed, not delivered in one piece
        assert stream.completion == expected


def test_stop_string_cuts_answer_and_stops_early(generator):
    settings = GenerationSettings(max_new_tokens=16)
    free = generator.complete(CONVERSATIONS[:1], IMAGES[:1], settings)[0]
    stop = free.text[len(free.text) // 2:][:3].strip() or free.text[-3:]
    expected_text = free.text[: free.text.find(stop)]
    stopped = generator.complete(CONVERSATIONS[:1], IMAGES[:1],
                                 GenerationSettings(max_new_tokens=16, stop=(stop, "never-appears")))[0]
    assert stopped.text == expected_text
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < free.completion_tokens
    stream = generator.stream(CONVERSATIONS[0], IMAGES[0], GenerationSettings(max_new_tokens=16, stop=(stop,)))
    assert "".join(stream) == expected_text


def test_stop_in_one_row_leaves_other_rows_alone(generator):
    settings = GenerationSettings(max_new_tokens=12)
    free = generator.generate(CONVERSATIONS, IMAGES, settings)
    stop = free[0][len(free[0]) // 2:][:3].strip()
    with_stop = generator.generate(CONVERSATIONS, IMAGES, GenerationSettings(max_new_tokens=12, stop=(stop,)))
    for free_text, stopped_text in zip(free, with_stop):
        cut = free_text.find(stop)
        assert stopped_text == (free_text if cut < 0 else free_text[:cut])


def test_end_of_turn_token_ends_each_row_separately(vlm):
    """Rows finishing at different steps: each answer ends at its own end-of-turn token, no padding leaks."""
    free_generator = Generator(vlm)
    settings = GenerationSettings(max_new_tokens=10)
    free = free_generator.complete(CONVERSATIONS, IMAGES, settings)
    # Declare the 3rd token the first row produces to be an end-of-turn token, as a template's end token is (the
    # generated ids themselves: the answer's text has its leading space stripped, so re-encoding it may differ)
    batch = free_generator._encode_batch(CONVERSATIONS, IMAGES)
    first_ids = free_generator._run_generate(batch, settings)[0, batch["input_ids"].shape[1]:].tolist()
    generator = Generator(vlm)
    generator.eos_token_ids = sorted({*generator.eos_token_ids, first_ids[2]})
    ended = generator.complete(CONVERSATIONS, IMAGES, settings)
    assert ended[0].finish_reason == "stop"
    assert ended[0].completion_tokens == 3
    assert free[0].text.startswith(ended[0].text)
    for free_row, ended_row in zip(free, ended):
        assert free_row.text.startswith(ended_row.text)
        assert ended_row.finish_reason == ("stop" if ended_row.completion_tokens < 10 else "length")


def test_max_new_tokens_bounds_the_answer(generator):
    for limit in (1, 5):
        completion = generator.complete(CONVERSATIONS[:1], IMAGES[:1], GenerationSettings(max_new_tokens=limit))[0]
        assert completion.completion_tokens == limit
        assert completion.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(generator):
    settings = [GenerationSettings(max_new_tokens=8, temperature=1.5, seed=seed) for seed in range(4)]
    state = torch.random.get_rng_state()
    first = [generator.generate(CONVERSATIONS[:2], IMAGES[:2], s) for s in settings]
    again = [generator.generate(CONVERSATIONS[:2], IMAGES[:2], s) for s in settings]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == again
    assert len({tuple(texts) for texts in first}) > 1, "different seeds should sample different answers"


def test_greedy_ignores_sampling_defaults_of_the_checkpoint(vlm):
    settings = GenerationSettings(max_new_tokens=8)
    expected = Generator(vlm).generate(CONVERSATIONS, IMAGES, settings)
    config = vlm.model.generation_config
    saved = (config.do_sample, config.temperature, config.top_p)
    config.do_sample, config.temperature, config.top_p = True, 1.5, 0.5
    try:
        assert Generator(vlm).generate(CONVERSATIONS, IMAGES, settings) == expected
    finally:
        config.do_sample, config.temperature, config.top_p = saved


@pytest.mark.parametrize("bad, message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(stop=("",)), "stop"),
])
def test_settings_reject_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**bad)


def test_collate_pads_per_token_tensors_left_and_concatenates_images():
    """Processor outputs beyond input_ids (token_type_ids, image_grid_thw) keep their rows aligned."""
    from medtune.models.collate import collate_prompts

    model = torch.nn.Linear(1, 1)
    model.device, model.dtype = torch.device("cpu"), torch.float32
    encodings = [
        {"input_ids": torch.tensor([[5, 6, 7]]), "token_type_ids": torch.tensor([[0, 1, 1]]),
         "pixel_values": torch.ones(1, 3, 4, 4, dtype=torch.float64), "image_grid_thw": torch.tensor([[1, 2, 2]])},
        {"input_ids": [8], "token_type_ids": torch.tensor([[1]]), "pixel_values": None},
    ]
    batch = collate_prompts(encodings, pad_token_id=0, model=model)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape == (1, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_unseeded_sampling_draws_new_answers(generator):
    settings = GenerationSettings(max_new_tokens=8, temperature=1.5)
    torch.manual_seed(0)
    answers = {generator.generate(CONVERSATIONS[:1], IMAGES[:1], settings)[0] for _ in range(4)}
    assert len(answers) > 1


def test_a_chatml_model_stops_at_its_end_of_turn_though_the_tokenizer_eos_is_another_token():
    """The offline tokenizer's EOS is ``</s>``; a model trained with chatml ends its answers with ``<|im_end|>``.
    Generation must stop there (else it writes a second answer after the first), in medtune and in plain
    transformers (the saved generation config), also for a model whose config does not list it yet."""
    from medtune.models import presets
    from medtune.models.build import build_vlm

    vlm = build_vlm(presets.tiny_spec(template="chatml"))
    end = vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end != vlm.tokenizer.eos_token_id
    assert vlm.model.generation_config.eos_token_id == sorted({vlm.tokenizer.eos_token_id, end})
    vlm.model.generation_config.eos_token_id = vlm.tokenizer.eos_token_id   # a checkpoint saved before the fix
    assert end in Generator(vlm).eos_token_ids
    # the LM head made to prefer <|im_end|> at every position: one token, then stop
    with torch.no_grad():
        vlm.model.lm_head.bias = torch.nn.Parameter(torch.full((vlm.model.lm_head.out_features,), -1e4))
        vlm.model.lm_head.bias[end] = 1e4
    completion = Generator(vlm).complete(CONVERSATIONS[:1], IMAGES[:1], GenerationSettings(max_new_tokens=8))[0]
    assert (completion.text, completion.finish_reason, completion.completion_tokens) == ("", "stop", 1)


def test_switching_template_moves_the_stop_tokens_with_it():
    from medtune.models import presets
    from medtune.models.build import build_vlm

    vlm = build_vlm(presets.tiny_spec(template="vicuna"))
    assert vlm.model.generation_config.eos_token_id == [vlm.tokenizer.eos_token_id]
    vlm.use_template("chatml")
    assert vlm.tokenizer.convert_tokens_to_ids("<|im_end|>") in vlm.model.generation_config.eos_token_id
