"""A quiet, informative console: one display per phase, plain lines in a log file, no deprecation warnings
from medtune's own files.

The end-to-end test runs `medtune train --tiny` on a shipped recipe with stdout and stderr redirected to
files, as a job scheduler or `nohup` would, and reads the files back.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from medtune.train.progress import LineProgress, progress_bar

ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                  "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_line_progress_writes_a_line_per_tenth_with_eta_and_the_final_line_once():
    out, clock = io.StringIO(), Clock()
    display = LineProgress(200, desc="encoding", unit="samples", file=out, clock=clock)
    for _ in range(200):
        clock.now += 0.5
        display.update(1)
    display.set_postfix({"loss": "1.2345"})
    display.close()
    display.close()   # closing twice (an exception path and the normal one) still ends with one line
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b[" not in out.getvalue()
    assert lines[0] == "encoding: 20/200 samples (10%), 0:10 elapsed, ETA 1:30, 2.00 samples/s"
    assert len(lines) == 10   # 10% ... 90%, then the final line; no second 100% line
    assert lines[-1] == "encoding: 200/200 samples in 1:40 (2.00 samples/s), loss=1.2345"


def test_line_progress_without_a_total_beats_every_minute_and_resumed_counts_are_not_a_rate():
    out, clock = io.StringIO(), Clock()
    display = LineProgress(None, desc="encoding", unit="samples", initial=0, file=out, clock=clock)
    for _ in range(150):
        clock.now += 1.0
        display.update(1)
    display.close()
    assert out.getvalue().splitlines() == ["encoding: 60 samples, 1:00 elapsed, 1.00 samples/s",
                                           "encoding: 120 samples, 2:00 elapsed, 1.00 samples/s",
                                           "encoding: 150 samples in 2:30 (1.00 samples/s)"]
    out, clock = io.StringIO(), Clock()
    resumed = LineProgress(100, desc="training", unit="steps", initial=50, file=out, clock=clock)
    clock.now += 10.0
    resumed.update(10)
    assert out.getvalue() == "training: 60/100 steps (60%), 0:10 elapsed, ETA 0:40, 1.00 steps/s\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_with_its_total_and_a_file_gets_lines():
    terminal = Terminal()
    with progress_bar(16, desc="encoding", unit="samples", file=terminal) as bar:
        bar.update(16)
    assert "encoding: 100%" in terminal.getvalue() and "16/16" in terminal.getvalue()
    log = io.StringIO()
    assert isinstance(progress_bar(16, desc="encoding", unit="samples", file=log), LineProgress)
    silent = progress_bar(16, desc="encoding", unit="samples", file=log, enabled=False)
    silent.update(3)
    silent.close()
    assert log.getvalue() == ""


@pytest.mark.slow
def test_train_tiny_into_log_files_reads_as_plain_lines_one_per_phase(tmp_path):
    """Two stages with activation checkpointing (transformers' use_cache notice) and a cold token cache
    (the encoding display), stdout and stderr to files."""
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    command = [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", "train", "demo",
               "--tiny", "--output", str(tmp_path / "run"), f"cache_dir={tmp_path / 'cache'}",
               "stages.*.gradient_checkpointing=true"]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        result = subprocess.run(command, stdout=out, stderr=err, env=SUBPROCESS_ENV, cwd=tmp_path, timeout=600)
    text = stdout.read_text() + stderr.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b[" not in text
    for noise in ("Loading weights", "Writing model shards", "use_cache", "%|"):
        assert noise not in text, noise
    lines = text.splitlines()
    for stage in ("align", "sft"):
        assert sum(line.startswith(f"stage {stage}: 2 steps") for line in lines) == 1
    assert sum(line.startswith("training: 2/2 steps in ") for line in lines) == 2       # each stage's, once
    encoding = [line for line in lines if line.startswith("encoding: ")]
    assert len(encoding) == 2 and all(line.startswith("encoding: 16/16 samples in ") for line in encoding)
    assert not [line for line in lines if "100%" in line]


def test_a_tiny_lora_stage_raises_no_warning_from_medtune_modules(tmp_path):
    """Warnings attributed to medtune's files are errors; any other is recorded and must not name a medtune file.

    (peft 0.21's PeftModel reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning attributed to transformers itself: a dependency's warning, not medtune's.)
    """
    from medtune.paths import recipe_path
    from medtune.train.recipe import load_recipe
    from medtune.train.run import run_recipe

    recipe = load_recipe(recipe_path("demo"), [
        f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "stages.*.gradient_checkpointing=true",
        "stages.1.lr.llm=0", "stages.1.lora.r=4", "stages.1.lora.alpha=4", "stages.1.lr.lora=1e-3"], tiny=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("error", module=r"medtune(\..*)?$")
        run_recipe(recipe)
    package = str(ROOT / "medtune")
    assert not [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if w.filename.startswith(package)]
    assert (tmp_path / "run" / "stage-1-sft" / "adapter" / "adapter_config.json").is_file()   # LoRA ran


def test_package_metadata_has_no_deprecated_form():
    """setuptools deprecates ``license = {text = ...}``; the SPDX string form (PEP 639) is what it wants."""
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distribution = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert distribution.metadata.license_expression == "Apache-2.0"
