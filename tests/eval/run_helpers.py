"""Helpers for the `medtune eval run` tests: an "answering" tiny model, reading runs back, a recording backend."""
import json
from pathlib import Path

LIMIT = 48  # the first 48 VQA-RAD test questions: 40 closed, 8 open
ANSWER_WORDS = ("yes", "no", " no", "left", "right", " ")  # what the answering model likes to say


def answering_model(out_dir: Path) -> Path:
    """presets.tiny_spec with larger random weights and a head that favours a few answer words and EOS.

    A freshly initialised tiny model says nearly the same thing to every question; this one's answers depend
    on the image and the question ("yes right", "no left no", "" ...), which makes equality checks meaningful.
    """
    import torch

    from medtune.models import presets
    from medtune.models.build import build_vlm

    vlm = build_vlm(presets.tiny_spec())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in vlm.model.named_parameters():
            if weight.dim() == 2 and "embed" not in name and "lm_head" not in name:
                weight.normal_(0.0, 0.2, generator=generator)
        favoured = sorted({i for word in ANSWER_WORDS for i in vlm.tokenizer.encode(word, add_special_tokens=False)}
                          | {vlm.tokenizer.eos_token_id})
        head = vlm.model.lm_head.weight
        head[favoured] = 3.0 * torch.randn(len(favoured), head.shape[1], generator=generator)
    vlm.save(out_dir)
    return out_dir


def predictions(out_dir: Path, name: str = "predictions.jsonl") -> dict[str, dict]:
    """``{id: record}`` without the fields that name the backend or the shard."""
    records = [json.loads(line) for line in (Path(out_dir) / name).read_text().splitlines()]
    by_id = {r["id"]: {k: v for k, v in r.items() if k not in ("backend", "shard")} for r in records}
    assert len(by_id) == len(records), "an id was answered twice"
    return by_id


def report_rows(out_dir: Path) -> list[dict]:
    return json.loads((Path(out_dir) / "results.json").read_text())["rows"]


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


class RecordingBackend:
    """Wraps a backend, remembers which ids it was asked, and can fail after a number of answers."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.asked = inner, fail_after, []
        self.name = inner.name

    def answer(self, requests):
        if self.fail_after is not None and len(self.asked) + len(requests) > self.fail_after:
            raise RuntimeError("injected failure")
        self.asked.extend(r.id for r in requests)
        return self.inner.answer(requests)
