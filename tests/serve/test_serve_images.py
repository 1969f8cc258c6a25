"""Answers that hold images, from a model that writes image tokens (a tiny Chameleon with a random pixel
decoder): `medtune serve` returns them to the official OpenAI client as base64 PNG content parts, `medtune chat`
saves them and prints their paths, the web page's handlers show them; a model that cannot draw refuses clearly."""
from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest

from serve_helpers import SUBPROCESS_ENV, free_port, start_medtune, stop

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
from PIL import Image  # noqa: E402

DRAW = [{"role": "user", "content": "Draw a chest X-ray."}]


@pytest.fixture(scope="module")
def drawing_dir(tmp_path_factory):
    from medtune.models.presets import tiny_chameleon
    from medtune.models.vqgan import ChameleonVQGANDecoder, ChameleonVQGANDecoderConfig

    vlm = tiny_chameleon()
    torch.manual_seed(0)
    vlm.attach_decoder(ChameleonVQGANDecoder(ChameleonVQGANDecoderConfig.from_transformers(vlm.model.config)))
    directory = tmp_path_factory.mktemp("models") / "tiny-chameleon"
    vlm.save(directory)
    return directory


@pytest.fixture(scope="module")
def reference(drawing_dir):
    from medtune.models.build import load_vlm
    from medtune.models.generation import GenerationSettings, Generator, ImageSampling

    torch.set_num_threads(1)
    generator = Generator(load_vlm(drawing_dir))
    # guided (Chameleon's scales), most likely code at each step: what each front end below asks for
    settings = GenerationSettings(max_new_tokens=80, modalities=("image",), image=ImageSampling(temperature=0))
    return generator.complete([[{"role": "user", "content": [{"type": "text", "text": DRAW[0]["content"]}]}]],
                              [[]], settings)[0]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_the_api_returns_the_image_to_the_openai_client(drawing_dir, tiny_model_dir, reference):
    port = free_port()
    process = start_medtune(["serve", str(drawing_dir), "--host", "127.0.0.1", "--port", str(port)],
                            f"http://127.0.0.1:{port}/health")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="tiny-chameleon", messages=DRAW, max_tokens=80,
                                                temperature=0, extra_body={"modalities": ["image"],
                                                                           "image_sampling": {"temperature": 0}})
        parts = answer.choices[0].message.content
        assert isinstance(parts, list) and [p["type"] for p in parts] == ["image_url"]
        url = parts[0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert image.size == (32, 32) and image.tobytes() == reference.images[0].tobytes()
        assert answer.choices[0].finish_reason == "stop"
        text = client.chat.completions.create(model="tiny-chameleon", messages=DRAW, max_tokens=4, temperature=0)
        assert isinstance(text.choices[0].message.content, str)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-chameleon", messages=DRAW, max_tokens=80, extra_body={
                "modalities": ["image"], "image_sampling": {"guidance": 3}})
        assert refused.value.body["param"] == "image_sampling"
        assert "unknown field 'guidance' (fields: guidance_text, guidance_image, temperature, top_p)" \
            in refused.value.body["message"]
    finally:
        stop(process)
    # a model that writes text only answers a request for images with a 400 naming the parameter
    port = free_port()
    process = start_medtune(["serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port)],
                            f"http://127.0.0.1:{port}/health")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-vlm", messages=DRAW, max_tokens=4,
                                           extra_body={"modalities": ["image"]})
        assert "cannot answer with images" in str(refused.value) and refused.value.body["param"] == "modalities"
    finally:
        stop(process)


@pytest.mark.slow
def test_chat_saves_the_image_and_prints_its_path(drawing_dir, reference, tmp_path):
    images = tmp_path / "answers"
    commands = "/set max_tokens 80\n/set modalities image\n/set image_temperature 0\nDraw a chest X-ray.\n/quit\n"
    done = subprocess.run([sys.executable, "-m", "medtune", "chat", str(drawing_dir), "--image-dir", str(images)],
                          input=commands, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = [line.removeprefix("[image: ").removesuffix("]") for line in done.stdout.splitlines()
             if line.startswith("[image: ")]
    assert len(saved) == 1 and saved[0].startswith(str(images)), done.stdout
    assert Image.open(saved[0]).tobytes() == reference.images[0].tobytes()


def test_the_web_page_shows_the_answer_s_image(drawing_dir, reference, tmp_path):
    from medtune.models.build import load_vlm
    from medtune.models.generation import Generator
    from medtune.serve.web import DemoHandlers, WebSession

    handlers = DemoHandlers(Generator(load_vlm(drawing_dir)), image_dir=tmp_path)
    assert handlers.draws
    *_, (question, session, history) = handlers.on_send("Draw a chest X-ray.", WebSession(), 0.0, 1.0, 80, None,
                                                        True)
    shown = [m["content"]["path"] for m in history if isinstance(m["content"], dict)]
    assert len(shown) == 1 and Image.open(shown[0]).size == (32, 32)


def test_a_text_model_has_no_image_switch_on_the_web_page(tiny_model_dir):
    from medtune.models.build import load_vlm
    from medtune.models.generation import Generator
    from medtune.serve.web import DemoHandlers

    assert DemoHandlers(Generator(load_vlm(tiny_model_dir))).draws is False
