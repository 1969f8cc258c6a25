"""Every native VLM family medtune supports, end to end on its tiny preset (medtune.models.presets.NATIVE_PRESETS).

For each family, `medtune train`'s runner trains two stages of 2 steps on bundled VQA-RAD: ``align`` packs its
samples (the default mode of the model's attention) and trains the projector; ``sft`` starts from align's saved
model and trains the projector whole beside LoRA on the language model (its model is the merge), the vision
tower frozen throughout. Then: the final model reloads with plain transformers as the family's class, with logits
identical to medtune's; plain transformers prepares the same inputs (where its processor builds here);
`medtune eval run --limit` answers through the checkpoint; `medtune serve`'s app answers exactly what its
Generator answers. README's support table lists what passes here.
"""
from __future__ import annotations

import base64
import io
import json

import pytest

torch = pytest.importorskip("torch")

from medtune.models.presets import NATIVE_PRESETS  # noqa: E402

torch.set_num_threads(1)

# preset -> the transformers class its checkpoints are (what plain transformers loads them as)
FAMILIES = {
    "tiny-qwen2-vl": "Qwen2VLForConditionalGeneration",
    "tiny-qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
    "tiny-idefics3": "Idefics3ForConditionalGeneration",
    "tiny-smolvlm": "SmolVLMForConditionalGeneration",
    "tiny-llava-hf": "LlavaForConditionalGeneration",
    "tiny-llava-next": "LlavaNextForConditionalGeneration",
    "tiny-internvl": "InternVLForConditionalGeneration",
    "tiny-gemma3": "Gemma3ForConditionalGeneration",
}
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the lung normal?"}]}]


def test_every_native_preset_is_covered_here():
    assert set(FAMILIES) == set(NATIVE_PRESETS)


def _image(seed: int = 0, size=(40, 36)):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _recipe(preset: str, out, stages=None, **settings):
    from medtune.train.recipe import parse_recipe

    data = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 8}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    stages = stages or [{"name": "align", "lr": {"projector": 1e-3}, "packing": True},
                        {"name": "sft", "lr": {"projector": 1e-3, "lora": 1e-3}, "lora": lora}]
    return parse_recipe({"model": {"preset": preset}, "output_dir": str(out), "report_to": ["none"],
                         "cache_dir": str(out / "cache"), **settings,
                         "defaults": {"data": data, "max_steps": 2, "batch_size": 2, "max_length": 256,
                                      "save_steps": 2, "log_steps": 1},
                         "stages": stages})


def _weights(model) -> dict:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_family_trains_reloads_in_plain_transformers_and_answers(preset, tmp_path):
    import transformers
    from transformers import AutoModelForImageTextToText

    from medtune.models.build import load_vlm
    from medtune.models.presets import build_preset
    from medtune.train.run import run_recipe

    if preset == "tiny-smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words (transformers' requirement)")
    initial = build_preset(preset)   # the same seed as the run's model: the weights training starts from
    before = _weights(initial.model)
    aligned, tuned = run_recipe(_recipe(preset, tmp_path / "run"))
    assert [aligned.steps, tuned.steps] == [2, 2] and tuned.samples == 8 and tuned.train_loss > 0
    assert aligned.trainable["trainable"].keys() == {"projector"}
    assert tuned.trainable["trainable"].keys() == {"projector", "lora"}
    model_dir = tmp_path / "run" / "stage-1-sft" / "model"

    # plain transformers loads the stage's model as the family's own class; the parts trained as asked
    plain = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert type(plain).__name__ == FAMILIES[preset]
    after = _weights(plain)
    assert after.keys() == before.keys()
    changed = {initial.part_of(n) for n in after if not torch.equal(after[n], before[n])}
    assert changed == {"projector", "llm"}   # llm: the merged adapters, only in q_proj / v_proj
    assert all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in after
               if initial.part_of(n) == "llm" and not torch.equal(after[n], before[n]))

    # medtune's reload gives the same logits as plain transformers on medtune's inputs
    vlm = load_vlm(model_dir)
    assert vlm.kind == "native" and type(vlm.processor).__name__ == type(initial.processor).__name__
    inputs = vlm.encode_prompt(QUESTION, [_image()])
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, vlm.model(**inputs).logits)
    # ... and plain transformers prepares those inputs itself: the whole processor where it builds here, else
    # (a family that also reads videos, without torchvision) its image processor and tokenizer
    from medtune.models.kinds.native import reads_videos, video_processors_available

    family_processor = getattr(transformers, type(vlm.processor).__name__)
    if not reads_videos(family_processor) or video_processors_available():
        theirs = transformers.AutoProcessor.from_pretrained(model_dir)
        text = theirs.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
        theirs = theirs(text=text, images=[_image()], return_tensors="pt")
        assert theirs.keys() == inputs.keys()
        assert all(torch.equal(theirs[k], inputs[k]) for k in inputs)
    else:
        pixels = transformers.AutoImageProcessor.from_pretrained(model_dir)(images=[_image()], return_tensors="pt")
        assert torch.equal(pixels["pixel_values"], inputs["pixel_values"])
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        assert tokenizer.get_vocab() == vlm.tokenizer.get_vocab()

    _answers_through_eval_run(model_dir, tmp_path / "eval")
    _answers_through_the_server(vlm)


def _answers_through_eval_run(model_dir, out) -> None:
    from medtune.cli import main

    assert main(["eval", "run", "--model", str(model_dir), "--out", str(out), "--limit", "2",
                 "--batch-size", "2"]) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and len({p["id"] for p in predictions}) == 2
    assert all(isinstance(p["prediction"], str) for p in predictions)


def _answers_through_the_server(vlm) -> None:
    """The OpenAI-compatible app `medtune serve` runs, in process: its answer is the Generator's."""
    fastapi_testclient = pytest.importorskip("fastapi.testclient")
    from medtune.models.generation import GenerationSettings, Generator
    from medtune.serve.api import ServerConfig, create_app

    generator = Generator(vlm)
    image = _image(1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Is the lung normal?"}]}]}
    expected = generator.complete([QUESTION], [[image]], GenerationSettings(max_new_tokens=6))[0]
    with fastapi_testclient.TestClient(create_app(generator, ServerConfig(model_id="tiny"))) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer == expected.text and response.json()["usage"]["completion_tokens"] == expected.completion_tokens


@pytest.mark.slow
def test_native_training_resumes_to_bitwise_the_same_weights(tmp_path):
    """Qwen2-VL (the processor rebuilt without its video part, multimodal rotary positions) resumed from a
    checkpoint ends where an uninterrupted run ends, packed, with per-part learning rates."""
    import shutil

    from transformers import AutoModelForImageTextToText

    from medtune.train.run import run_recipe, stage_dir

    stage = [{"name": "sft", "lr": {"projector": 1e-3, "llm": 1e-4}, "packing": "position_ids", "max_steps": 4}]

    def final(out):
        return _weights(AutoModelForImageTextToText.from_pretrained(out / "stage-0-sft" / "model"))

    run_recipe(_recipe("tiny-qwen2-vl", tmp_path / "whole", stage))
    interrupted = _recipe("tiny-qwen2-vl", tmp_path / "resumed", stage)
    run_recipe(interrupted)
    directory = stage_dir(interrupted.output_dir, 0, interrupted.stages[0])
    shutil.rmtree(directory / "model")            # as if killed after checkpoint-2
    shutil.rmtree(directory / "checkpoint-4")
    [result] = run_recipe(interrupted, resume=True)
    assert result.resumed_from == str(directory / "checkpoint-2") and result.steps == 4
    whole, resumed = final(tmp_path / "whole"), final(tmp_path / "resumed")
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
