"""`medtune chat` driven through its real command line: lines fed to stdin, answers read from stdout and
compared with the Generator's answers for the same conversation (greedy, same checkpoint)."""
import subprocess
import sys

import numpy as np
import pytest

from medtune.models.generation import GenerationSettings
from serve_helpers import SUBPROCESS_ENV, ct_dicom_bytes, noise_image

pytest.importorskip("torch")


def run_chat(args: list[str], lines: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", "chat", *args]
    return subprocess.run(command, input="\n".join(lines) + "\n", env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)


def ask(generator, conversation, images, max_new_tokens):
    return generator.generate([conversation], [images], GenerationSettings(max_new_tokens=max_new_tokens))[0]


def test_conversation_commands_and_streamed_answers(tiny_model_dir, generator, tmp_path):
    from medtune.data.images import load_image

    noise_image(5, (48, 36)).save(tmp_path / "scan.png")
    result = run_chat([str(tiny_model_dir), "--image", str(tmp_path / "scan.png"), "--max-tokens", "8"], [
        "What is shown?", "/set max_tokens 5", "And the size?", "/set temperature warm", "/image missing.png",
        "/frobnicate", "/reset", "What is shown?", "/quit", "this line comes after /quit",
    ])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == ("greedy decoding (temperature 0): the same question gets the same "
                                             "answer, where the API samples at 1 unless asked; /set temperature 0.7 "
                                             "to sample")
    image = load_image("scan.png", tmp_path)
    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    answer1 = ask(generator, first_turn, [image], 8)
    answer2 = ask(generator, [*first_turn, {"role": "assistant", "content": answer1},
                              {"role": "user", "content": [{"type": "text", "text": "And the size?"}]}], [image], 5)
    answer3 = ask(generator, first_turn, [image], 5)  # after /reset: the image goes with the next question again
    answers = [line.removeprefix("assistant: ") for line in result.stdout.splitlines()
               if line.startswith("assistant: ")]
    assert answers == [answer1, answer2, answer3]
    assert "error: temperature must be a number, got 'warm'" in result.stdout
    assert "error: no image file at missing.png" in result.stdout
    assert "error: unknown command /frobnicate (type /help)" in result.stdout
    assert "conversation reset" in result.stdout


def test_the_banner_says_when_answers_are_sampled():
    from medtune.serve.chat import decoding_note

    assert decoding_note(GenerationSettings(temperature=0.7, seed=3)) == (
        "sampling at temperature 0.7, top_p 1, seed 3: answers vary; /set temperature 0 for greedy decoding")
    assert "no seed" in decoding_note(GenerationSettings(temperature=1.0, top_p=0.9))
    # greedy text, but image answers drawn at Chameleon's 0.7: the banner says they vary
    drawing = decoding_note(GenerationSettings(modalities=("image",)))
    assert drawing.endswith("; image answers are sampled at temperature 0.7 (Chameleon's), so they vary: "
                            "/set image_temperature 0 for the most likely codes")
    from medtune.models.generation import ImageSampling

    assert "image answers" not in decoding_note(GenerationSettings(modalities=("image",),
                                                                   image=ImageSampling(temperature=0)))


def test_image_answer_settings_change_with_set_and_bad_ones_are_refused():
    from medtune.models.generation import ImageSampling
    from medtune.serve.chat import ChatCommandError, ChatSession

    session = ChatSession(None, GenerationSettings(modalities=("image",)))
    assert session.settings.image == ImageSampling(guidance_text=3.0, guidance_image=1.2, temperature=0.7, top_p=0.9)
    session.set("image_guidance", "1,1")
    session.set("image_temperature", "0")
    session.set("image_top_p", "0.5")
    assert session.settings.image == ImageSampling(guidance_text=1, guidance_image=1, temperature=0, top_p=0.5)
    assert not session.settings.image.guided
    assert "image_guidance=1,1 image_temperature=0 image_top_p=0.5" in session.describe()
    for name, value, message in (("image_guidance", "3", "image_guidance must be two numbers, TEXT,IMAGE"),
                                 ("image_guidance", "3,-1", "image guidance image scale must be between 0 and 20"),
                                 ("image_temperature", "hot", "image_temperature must be a number, got 'hot'")):
        with pytest.raises(ChatCommandError, match=message):
            session.set(name, value)
    assert session.settings.image.guidance_text == 1   # a refused value changes nothing


def test_dicom_window_and_nifti_slice(tiny_model_dir, generator, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    from medtune.data.images import load_image
    from medtune.data.schema import ImageRef

    (tmp_path / "ct.dcm").write_bytes(ct_dicom_bytes())
    volume = np.stack([np.full((24, 20), 100.0 * k) + np.arange(20) for k in range(5)], axis=-1)
    nibabel.save(nibabel.Nifti1Image(volume.astype(np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    result = run_chat([str(tiny_model_dir), "--image", str(tmp_path / "ct.dcm"), "--window", "lung",
                       "--max-tokens", "6"],
                      ["Any nodule?", "/set window none", "/set slice 1", f"/image {tmp_path / 'vol.nii.gz'}",
                       "Which slice?"])
    assert result.returncode == 0, result.stderr
    question = lambda text: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]  # noqa
    dicom = load_image("ct.dcm", tmp_path, window="lung")
    nifti = load_image(ImageRef("vol.nii.gz", slice=1), tmp_path)
    assert dicom.tobytes() != load_image("ct.dcm", tmp_path).tobytes()  # the window preset matters
    answers = [line.removeprefix("assistant: ") for line in result.stdout.splitlines()
               if line.startswith("assistant: ")]
    assert answers == [ask(generator, question("Any nodule?"), [dicom], 6),
                       ask(generator, question("Which slice?"), [nifti], 6)]


def test_missing_image_is_a_one_line_error(tiny_model_dir, tmp_path):
    result = run_chat([str(tiny_model_dir), "--image", str(tmp_path / "nope.png")], [])
    assert result.returncode == 2
    assert result.stderr.strip() == f"medtune chat: error: no image file at {tmp_path / 'nope.png'}"


def test_unknown_window_preset_is_a_one_line_error(tiny_model_dir):
    result = run_chat([str(tiny_model_dir), "--window", "sunset"], [])
    assert result.returncode == 2
    assert "unknown window preset 'sunset'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("verb", ["chat", "serve", "web"])
def test_missing_model_folder_is_a_one_line_error(verb, tmp_path):
    command = [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", verb,
               str(tmp_path / "no-such-model")]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"medtune {verb}: error: no model checkpoint at {tmp_path / 'no-such-model'} "
                                     "(a folder with config.json)")


def test_add_image_sends_another_view_with_the_next_message_in_order(tiny_model_dir, generator, tmp_path):
    """/add-image adds rather than replaces: the second image goes with the next message, after the first one
    (as two image parts in order, the way the API takes them); /reset sends both again; /image starts over."""
    from medtune.data.images import load_image

    noise_image(5, (48, 36)).save(tmp_path / "frontal.png")
    noise_image(9, (40, 40)).save(tmp_path / "lateral.png")
    result = run_chat([str(tiny_model_dir), "--image", str(tmp_path / "frontal.png"), "--max-tokens", "6"], [
        "Any effusion?", f"/add-image {tmp_path / 'lateral.png'}", "And on the lateral view?", "/reset",
        "Compare the views.", f"/image {tmp_path / 'lateral.png'}", "What is shown?", "/add-image", "/settings"])
    assert result.returncode == 0, result.stderr
    frontal, lateral = load_image("frontal.png", tmp_path), load_image("lateral.png", tmp_path)
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Any effusion?"}]}]
    answer1 = ask(generator, first, [frontal], 6)
    second = [*first, {"role": "assistant", "content": answer1},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And on the lateral view?"}]}]
    both = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Compare the views."}]}]
    alone = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    expected = [answer1, ask(generator, second, [frontal, lateral], 6), ask(generator, both, [frontal, lateral], 6),
                ask(generator, alone, [lateral], 6)]
    answers = [line.removeprefix("assistant: ") for line in result.stdout.splitlines()
               if line.startswith("assistant: ")]
    assert answers == expected
    assert f"image 2: {tmp_path / 'lateral.png'} (sent with your next message)" in result.stdout
    assert "error: usage: /add-image PATH" in result.stdout
    assert f"image={tmp_path / 'lateral.png'}" in result.stdout.splitlines()[-1]


def test_a_message_the_model_cannot_take_leaves_with_its_images(monkeypatch):
    """A model that takes one image: the message that brings a second one is refused, and it and that image leave
    the conversation, so the next message (and /reset) are answered, not refused again."""
    import io

    from medtune.serve import chat
    from medtune.serve.chat import ChatSession, chat_loop

    class OneImage:
        def stream(self, messages, images, settings):
            places = sum(part["type"] == "image" for m in messages if isinstance(m["content"], list)
                         for part in m["content"])
            assert places == len(images), (places, len(images))
            if len(images) > 1:
                raise ValueError("this model takes one image")
            return iter([f"ok with {len(images)} image(s)"])

    monkeypatch.setattr(chat, "load_image_file", lambda path, window=None, slice=None: f"pixels of {path}")
    session = ChatSession(OneImage(), GenerationSettings(), named=[("a.png", "pixels of a.png")])
    out = io.StringIO()
    chat_loop(session, ["hi", "/add-image b.png", "compare", "just text", "/reset", "again"], out)
    lines = out.getvalue().splitlines()
    assert "error: this model takes one image (its 1 image left the conversation)" in lines
    assert [line for line in lines if line.startswith("assistant: ok")] == [
        "assistant: ok with 1 image(s)", "assistant: ok with 1 image(s)", "assistant: ok with 1 image(s)"]
    assert session.named == [("a.png", "pixels of a.png")]
