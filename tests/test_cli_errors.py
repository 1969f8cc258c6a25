"""Every verb, given a bad path, stops with one line on stderr and exit code 2, never a traceback.

Each verb's path argument is given five kinds of bad input: a path that does not exist, a file of the wrong
type (a PNG where text is expected, a data file where a checkpoint is expected), an empty file, a directory where
a file is expected (or a folder without a checkpoint where a checkpoint is expected), and a file the user may not
read. The verbs run through the real entry point (``medtune.cli.main``), in process, so the whole sweep takes
seconds: each fails before any model weights load.

Permission denied: these tests run as root in CI and in the development container, and root reads a mode-000
file anyway, so ``chmod`` cannot make one unreadable. The ``denied`` fixture therefore chmods the file *and*,
when running as root, makes ``open`` raise the ``PermissionError`` the kernel would raise for that one path
(``builtins.open`` and ``io.open``, which ``pathlib`` uses). Code sees the same exception either way.
"""
from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.data.jsonl import write_samples
from medtune.data.schema import Metadata, qa_sample

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"

# verb -> argv with X (the bad path) and OUT (a fresh output path); kind of input X stands for.
DATA_VERBS = {
    "data convert": ["data", "convert", "--from", "llava", "--to", "canonical", "X", "OUT"],
    "data convert (detected format)": ["data", "convert", "--to", "canonical", "X", "OUT"],
    "data check": ["data", "check", "X"],
    "data check (llava)": ["data", "check", "X", "--format", "llava"],
    "data stats": ["data", "stats", "X"],
    "data leakage": ["data", "leakage", "X", "GOOD"],
    "eval score (predictions)": ["eval", "score", "X", "--gt", "GOOD"],
    "eval score (ground truth)": ["eval", "score", "PREDS", "--gt", "X"],
    "eval merge": ["eval", "merge", "X", "--out", "OUT"],
    "eval compare": ["eval", "compare", "X", "X"],
}
RECIPE_VERBS = {
    "data mix": ["data", "mix", "X", "OUT"],
    "model build": ["model", "build", "X", "OUT"],
    "train": ["train", "X"],
    "demo": ["demo", "--recipe", "X", "--output", "OUT"],
}
MODEL_VERBS = {
    "model info": ["model", "info", "X"],
    "model export-native": ["model", "export-native", "X", "OUT"],
    "model export-chameleon": ["model", "export-chameleon", "X", "OUT"],
    "eval run": ["eval", "run", "--model", "X", "--out", "OUT", "--limit", "1"],
    "merge": ["merge", "X", "OUT"],
    "chat": ["chat", "X"],
    "serve": ["serve", "X"],
    "web": ["web", "X"],
    "tokenize-images": ["tokenize-images", "GOOD", "OUT.parquet", "--model", "X"],
}
KINDS = ("missing", "wrong type", "empty", "directory", "denied")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory with good inputs (GOOD, PREDS) beside which each case puts its bad one."""
    monkeypatch.chdir(tmp_path)
    write_samples(tmp_path / "good.jsonl", [qa_sample("q1", "Is there a mass?", "no",
                                                      meta=Metadata(answer_type="closed"))])
    (tmp_path / "preds.jsonl").write_text(json.dumps({"id": "q1", "prediction": "no"}) + "\n")
    return tmp_path


@pytest.fixture
def denied(monkeypatch):
    """Make ``path`` unreadable: chmod 000, and (as root, who ignores modes) an open() that refuses it."""
    refused: set[str] = set()
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) in refused:
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    def deny(path: Path) -> Path:
        path.chmod(0)
        if os.geteuid() == 0:
            refused.add(os.path.abspath(path))
            monkeypatch.setattr(builtins, "open", guarded_open)
            monkeypatch.setattr(io, "open", guarded_open)
        return path

    yield deny
    for path in refused:
        Path(path).chmod(0o644)


def bad_input(kind: str, slot: str, root: Path, deny) -> str:
    """The bad path of ``kind`` for a slot holding a data file, a recipe/spec YAML or a model checkpoint."""
    if kind == "missing":
        return "./no-such-model" if slot == "model" else str(root / "no-such-file.json")
    if kind == "empty":
        (root / "empty.json").write_bytes(b"")
        return str(root / "empty.json")
    if kind == "directory":
        (root / "folder").mkdir()
        return str(root / "folder")
    if kind == "wrong type":
        if slot == "model":  # a folder with a config.json that describes no model
            (root / "notamodel").mkdir()
            (root / "notamodel" / "config.json").write_text('["not", "a", "config"]\n')
            return str(root / "notamodel")
        (root / "scan.png").write_bytes(PNG)
        return str(root / "scan.png")
    if kind == "denied":
        if slot == "model":
            (root / "locked").mkdir()
            (root / "locked" / "config.json").write_text('{"model_type": "llava"}\n')
            deny(root / "locked" / "config.json")
            return str(root / "locked")
        source = {"data": root / "good.jsonl", "recipe": root / "recipe.yaml"}[slot]
        if slot == "recipe":
            source.write_text("stages: []\n")
        return str(deny(source))
    raise AssertionError(kind)


CASES = [pytest.param(verb, argv, slot, kind, id=f"{verb}: {kind}")
         for slot, verbs in (("data", DATA_VERBS), ("recipe", RECIPE_VERBS), ("model", MODEL_VERBS))
         for verb, argv in verbs.items() for kind in KINDS]


@pytest.mark.parametrize("verb, argv, slot, kind", CASES)
def test_bad_path_is_one_line_and_exit_code_2(verb, argv, slot, kind, workspace, denied, capsys):
    bad = bad_input(kind, slot, workspace, denied)
    names = {"X": bad, "OUT": str(workspace / "out"), "OUT.parquet": str(workspace / "out.parquet"),
             "GOOD": str(workspace / "good.jsonl"), "PREDS": str(workspace / "preds.jsonl")}
    code = main([names.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1, err
    assert errors[0].startswith("medtune "), err


@pytest.mark.parametrize("argv", [["eval", "run", "--model", "./no-such-model", "--out", "out"],
                                  ["model", "info", "./no-such-model"]])
def test_a_model_path_that_does_not_exist_is_named_not_looked_up_on_the_hub(argv, workspace, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("error: no model checkpoint at ./no-such-model (a folder with config.json)")
    assert "Repo id" not in err


def test_verbose_keeps_the_traceback(workspace):
    with pytest.raises(FileNotFoundError):
        main(["-v", "model", "info", "./no-such-model"])


# ---- damaged and hostile weight files --------------------------------------------------------------------------

def _damaged(data: bytes) -> dict[str, bytes]:
    """A safetensors file five ways broken: header length absurd, header not JSON, tensors past the end of the
    file, cut in half, empty."""
    import struct

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10 ** 12]
    past_end = json.dumps(header).encode()
    past_end += b" " * (-len(past_end) % 8)
    return {"header too large": struct.pack("<Q", 2 ** 40) + data[8:],
            "header not JSON": struct.pack("<Q", size) + b"{" * size + data[8 + size:],
            "offsets past the end": struct.pack("<Q", len(past_end)) + past_end + data[8 + size:],
            "truncated": data[:len(data) // 2], "empty": b""}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert main(["model", "build", "tiny", str(folder)]) == 0
    return folder


class _RunsCode:
    """A pickled object that would create a file if unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


DAMAGES = ("header too large", "header not JSON", "offsets past the end", "truncated", "empty")
BROKEN = [*DAMAGES, "pickle that runs code"]
WEIGHT_VERBS = {verb: argv for verb, argv in MODEL_VERBS.items() if verb != "tokenize-images"}


@pytest.mark.parametrize("verb", list(WEIGHT_VERBS))
@pytest.mark.parametrize("damage", BROKEN)
def test_broken_or_hostile_weights_are_one_line_naming_the_file(verb, damage, tiny_checkpoint, workspace, capsys):
    import shutil

    import torch

    folder = workspace / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    weights = folder / "model.safetensors"
    marker = workspace / "code-ran"
    if damage == "pickle that runs code":
        weights.unlink()
        weights = folder / "pytorch_model.bin"
        torch.save({"model.weight": _RunsCode(str(marker))}, weights)
    else:
        weights.write_bytes(_damaged(weights.read_bytes())[damage])
    argv = WEIGHT_VERBS[verb]
    code = main([{"X": str(folder), "OUT": str(workspace / "out")}.get(a, a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(weights) in errors[0]
    assert "weights_only=False" not in err and not marker.exists()
    if damage != "pickle that runs code":
        assert "not a usable safetensors file" in errors[0]


def test_a_full_disk_is_one_line_and_the_previous_output_is_kept(workspace, monkeypatch, capsys):
    import errno

    import medtune.data.jsonl as jsonl

    out = workspace / "out.jsonl"
    out.write_text("previous\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsonl.os, "fsync", full)
    code = main(["data", "convert", "--to", "canonical", str(workspace / "good.jsonl"), str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("no space left on the device (make room and run the command "
                                                 "again: nothing half-written is picked up)")
    assert out.read_text() == "previous\n" and not list(workspace.glob(".out.jsonl*"))
