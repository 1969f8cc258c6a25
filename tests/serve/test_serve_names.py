"""What a user reads back from a served model: answers without the leading space a tokenizer decodes, and the
checkpoint's own name (not the generic ``model`` folder medtune writes) as model id and page title."""
import pytest

from medtune.models.generation import GenerationSettings

pytest.importorskip("torch")

QUESTIONS = ["Is there a fracture?", "What organ is shown?", "Is the heart enlarged?", "Which side?"]


def conversation(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_answers_carry_no_leading_whitespace(generator):
    """The tiny model's byte-level tokenizer decodes its first answer token with a space (" between ...")."""
    settings = GenerationSettings(max_new_tokens=8)
    completions = generator.complete([conversation(q) for q in QUESTIONS], [[] for _ in QUESTIONS], settings)
    for question, completion in zip(QUESTIONS, completions):
        assert completion.text and completion.text == completion.text.lstrip(), repr(completion.text)
        streamed = list(generator.stream(conversation(question), [], settings))
        assert "".join(streamed) == completion.text
        assert streamed[0] == streamed[0].lstrip()


def test_answers_are_still_cut_at_stop_strings(generator):
    free = generator.generate([conversation(QUESTIONS[0])], [[]], GenerationSettings(max_new_tokens=16))[0]
    stop = free[len(free) // 2:][:3].strip()
    settings = GenerationSettings(max_new_tokens=16, stop=(stop,))
    cut = generator.generate([conversation(QUESTIONS[0])], [[]], settings)[0]
    assert cut == free[: free.find(stop)]
    assert "".join(generator.stream(conversation(QUESTIONS[0]), [], settings)) == cut


@pytest.mark.parametrize("given, name", [
    ("runs/small-1a2b/stage-1-sft/model", "stage-1-sft"),
    ("medtune-output/demo/model", "demo"),
    ("medtune-output/demo/model/", "demo"),
    ("runs/x/stage-0-align/checkpoint-40", "stage-0-align"),
    ("./my-finetune", "my-finetune"),
    ("microsoft/llava-med-v1.5-mistral-7b", "llava-med-v1.5-mistral-7b"),
    ("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"),
])
def test_checkpoint_name(given, name):
    from medtune.serve.cli import checkpoint_name

    assert checkpoint_name(given) == name


def test_checkpoint_name_of_the_current_folder(tmp_path, monkeypatch):
    from medtune.serve.cli import checkpoint_name

    (tmp_path / "liver-vqa" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "liver-vqa" / "model")
    assert checkpoint_name(".") == "liver-vqa"
