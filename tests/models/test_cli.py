"""`medtune model build` / `medtune model info` through the real CLI entry point."""
import warnings

import pytest

torch = pytest.importorskip("torch")

from medtune.cli import main  # noqa: E402


def test_build_then_info(tmp_path, capsys):
    out = tmp_path / "vlm"
    assert main(["model", "build", "tiny", str(out), "projector=attn_pool+mlp2x_gelu", "projector_queries=6",
                 "template=chatml"]) == 0
    assert "6 image tokens per image" in capsys.readouterr().out
    from medtune.models.build import load_vlm

    vlm = load_vlm(out)
    assert vlm.model.config.projector_queries == 6 and vlm.template == "chatml"
    assert main(["model", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"{vlm.num_parameters():,} parameters" in info and "projector: attn_pool+mlp2x_gelu" in info


@pytest.fixture
def library_bars_on(monkeypatch):
    """transformers' and the hub's progress bars switched on, as in a process that imported them before the verb
    ran; their state and the environment are put back afterwards."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    from medtune.cli import LIBRARY_PROGRESS_ENV

    was_on = transformers_logging.is_progress_bar_enabled()
    for variable in LIBRARY_PROGRESS_ENV:
        monkeypatch.delenv(variable, raising=False)
    with warnings.catch_warnings():
        # the hub keeps its own bars off if an earlier main() in this process set its variable before the hub
        # was imported, and warns; transformers' switch, which draws "Loading weights", still turns on
        warnings.simplefilter("ignore", UserWarning)
        transformers_logging.enable_progress_bar()
    yield
    if not was_on:
        transformers_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()


def test_build_and_info_show_no_library_progress_bar(tmp_path, capsys, library_bars_on):
    out = tmp_path / "vlm"
    assert main(["model", "build", "tiny", str(out)]) == 0
    assert main(["model", "info", str(out)]) == 0
    printed = "".join(capsys.readouterr())
    assert "parameters" in printed
    for bar in ("Loading weights", "Writing model shards", "it/s]", "\r"):
        assert bar not in printed


def test_build_from_a_spec_file(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("vision: {model_type: clip_vision_model, image_size: 32, patch_size: 16, hidden_size: 32,\n"
                    "         intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4}\n"
                    "llm: {model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,\n"
                    "      num_attention_heads: 4, num_key_value_heads: 2}\n"
                    "tokenizer: offline\ntemplate: qwen\n")
    assert main(["model", "build", str(spec), str(tmp_path / "vlm"), "vision_feature_select=cls_patch"]) == 0
    assert "5 image tokens per image" in capsys.readouterr().out  # (32 / 16)^2 patches + CLS


@pytest.mark.parametrize("argv, message", [
    (["model", "build", "tiny", "OUT", "projector=mlp3x"], "ModelSpec.projector: 'mlp3x' is not one of"),
    (["model", "build", "tiny", "OUT", "colour"], "override 'colour' is not key=value"),
    (["model", "build", "no-such.yaml", "OUT"], "neither a model preset"),
    (["model", "info", "."], "is not a model checkpoint"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [str(tmp_path) if a == "." else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
