"""A quiet, informative console: one display per phase, plain lines in a log file, no deprecation warnings
from medtune's own files.

The end-to-end test runs `medtune train --tiny` on a shipped recipe with stdout and stderr redirected to
files, as a job scheduler or `nohup` would, and reads the files back.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                  "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


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
