"""A Python in which medtune cannot be imported, as a user of plain transformers (or another engine) has.

:data:`REFUSE_MEDTUNE` opens every such script: an import finder that refuses ``medtune`` however it is installed.
:func:`run_without_medtune` runs one with ``python -I`` (no script directory, no user site), offline, on one
thread and in the MKL mode medtune runs in (it sets MKL_CBWR on import): bit-identical results need the same one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REFUSE_MEDTUNE = r'''
import importlib.abc, json, sys

class RefuseMedtune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "medtune":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, RefuseMedtune())
'''


def run_without_medtune(script: str, work: Path, *args: str) -> None:
    """Write ``REFUSE_MEDTUNE + script`` to ``work/plain.py`` and run it with ``args``; it must succeed."""
    (work / "plain.py").write_text(REFUSE_MEDTUNE + script)
    env = {"HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "MKL_CBWR": os.environ["MKL_CBWR"]}
    done = subprocess.run([sys.executable, "-I", str(work / "plain.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
