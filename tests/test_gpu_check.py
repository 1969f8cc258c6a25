"""benchmarks/gpu_check.py's dry run: the one script a lent GPU machine runs builds every check here, on the CPU.

The dry run runs the packed-vs-unpacked loss check for real (fp32, sdpa), one step of each MFU layout on a
2-layer copy of the 1.85 B model, the Trainer-engine recipes' validation, and batched evaluation on a few
questions; it exits 0 only when nothing failed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medtune.paths import project_root


@pytest.mark.slow
def test_the_gpu_check_dry_run_builds_every_check_and_passes_on_the_cpu(tmp_path):
    script = project_root() / "benchmarks" / "gpu_check.py"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl").write_bytes(b"")
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path), "--wheels", str(wheels)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    by_check = {}
    for row in rows:
        by_check.setdefault(row["check"], []).append(row)
    # the wheels that travel with the script are installed first (planned, in a dry run), one row each
    assert [(row["setting"], row["status"]) for row in by_check.pop("setup")] == [
        ("bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "planned")]
    assert set(by_check) == {"packed-loss", "mfu", "fsdp2", "zero2", "zero3", "qlora", "eval-batching", "post-training"}
    assert [(row["setting"], row["status"]) for row in by_check["post-training"]] == [
        ("dpo", "planned"), ("dpo, precomputed reference", "planned"), ("grpo", "planned")]
    assert not [row for row in rows if row["status"] == "FAIL"]
    sdpa = next(row for row in by_check["packed-loss"] if row["setting"].startswith("sdpa"))
    assert sdpa["status"] == "ok" and len(sdpa["details"]["packed"]) == 6
    assert all(row["status"] == "planned" for row in by_check["mfu"])
    assert by_check["mfu"][0]["details"]["parameters"] > 1.5e9
    # a step a package cannot travel for is skipped with its reason, never silently
    assert all(row["result"] for row in rows if row["status"] == "skipped")
    assert "answers identical: True" in by_check["eval-batching"][-1]["result"]
    assert "medtune GPU check on CPU (dry run)" in done.stdout
