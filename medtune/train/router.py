"""A router stage: train a domain classifier on a model's hidden states and save it as an MoE router file.

Med-MoE trains its router before the MoE stage, as a modality classifier (CT / MRI / X-ray / pathology) on its
stage-2 model, loads the same weights into the gate of every MoE layer and freezes them; its notebook is not
part of its repository, and the file's path is written into its model code. Here the router is a stage of
the recipe, and its file is what the MoE stage names (``moe.router: stage:NAME``).

Choices, each a setting of :class:`RouterTraining` (a router stage's ``router`` section):

* What the classifier sees: the input of decoder layer ``layer``'s FFN (by default layer 0, the first MoE
  layer), i.e. exactly what the router is applied to in the MoE stage, token by token. With ``pooling: token``
  every real token (image tokens and text) is one example labelled with its sample's domain; with ``mean``
  each sample is one example, the mean of its tokens (Med-MoE's notebook pools over tokens and layers).
* Labels: a sample metadata field (``modality``, ``organ``, or a key of ``meta.extra``). Classes are listed in
  expert order (expert i learns class i); by default the labels found, sorted, so the mapping is reproducible
  (Med-MoE's came from a Python ``set``, whose order changes between processes). A router with more experts
  than classes leaves the extra rows without examples: training only lowers their logits, so no token starts
  on those experts until the MoE stage moves them (or set ``num_experts`` to the number of classes).
* Held-out split by image: every question about an image falls on one side, since benchmark splits such as
  VQA-RAD's share images between train and test. The report gives held-out accuracy per sample (the argmax of
  its tokens' mean logits) and per token, beside the majority class, and a confusion table.

Outputs in the stage directory: ``router.safetensors`` (``weight`` [experts, hidden], ``bias`` [experts]),
``router.json`` and ``router.md``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.data.jsonl import Tally, write_json
from medtune.errors import RecipeError
from medtune.validation import Int, Number, Str, section

log = logging.getLogger(__name__)

ROUTER_FILE = "router.safetensors"
REPORT_FILE = "router.json"
BATCH = 8
TOKENS_PER_STEP = 4096


@section
@dataclass
class RouterTraining:
    """A router stage: a domain classifier trained on hidden states of the current model, saved as a router
    file an MoE stage loads (Med-MoE trains its router beforehand and freezes it in stage 3)."""

    label: Str = "modality"
    """The sample metadata field that names the domain: modality, organ, or a key of meta.extra."""
    classes: list[Str] = field(default_factory=list)
    """Domains in expert order (expert i is class i); empty: the labels found in the data, sorted."""
    num_experts: Int | None = None
    """Rows of the router (the MoE stage's num_experts); default: one per class. Rows beyond the classes have
    no examples, so training only pushes their logits down: no token starts on those experts."""
    layer: Int = 0
    """The decoder layer whose FFN input the router sees (the first MoE layer: Med-MoE loads the same router
    into every MoE layer)."""
    pooling: Str = "token"
    """``token``: every token is an example labelled with its sample's domain, as routing is applied;
    ``mean``: one example per sample, its tokens' mean (closer to Med-MoE's notebook, which pooled)."""
    held_out: Number = 0.2
    """Share of *images* held out for the report (every question about an image stays on one side)."""
    epochs: Int = 30
    lr: Number = 1e-2
    seed: Int = 0

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("label: name a metadata field (modality, organ, ...)")
        if self.pooling not in ("token", "mean"):
            raise ValueError(f"pooling: {self.pooling!r} is not one of token, mean")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out: must be in (0, 1), got {self.held_out}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: {self.classes} repeats a class")
        if self.num_experts is not None and self.classes and self.num_experts < len(self.classes):
            raise ValueError(f"num_experts: {self.num_experts} experts cannot hold {len(self.classes)} classes")
        for name, low in (("epochs", 1), ("layer", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be at least {low}, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


def train_router(vlm, samples, spec: RouterTraining, out_dir: Path, *, tally: Tally, strict: bool = False) -> dict:
    """Fit the router on ``samples`` ((sample, image_root) pairs), write its file and report; return the report."""
    import torch

    from medtune.models.processing import SkipSample

    classes = list(spec.classes)
    labelled = []
    for sample, root in samples:
        tally.read += 1
        label = _label(sample, spec.label)
        if label is None:
            tally.skip(f"no {spec.label}", sample.id)
            continue
        if classes and label not in classes:
            tally.skip(f"{spec.label} not in router.classes", f"{sample.id}: {label!r}")
            continue
        labelled.append((sample, root, label))
    if not classes:
        classes = sorted({label for _, _, label in labelled})
    if len(classes) < 2:
        raise RecipeError(f"router: the data names {len(classes)} {spec.label} value(s) ({', '.join(classes)}); a "
                          "domain router needs at least two")
    num_experts = spec.num_experts or len(classes)
    train, held_out = split_by_image(labelled, spec.held_out, spec.seed)
    started = time.monotonic()
    features = {}
    for part, items in (("train", train), ("held_out", held_out)):
        features[part] = _features(vlm, items, classes, spec, tally=tally, strict=strict, skip_class=SkipSample)
    tally.written = len(features["train"]["sample_labels"]) + len(features["held_out"]["sample_labels"])
    if not len(features["train"]["sample_labels"]) or not len(features["held_out"]["sample_labels"]):
        raise RecipeError(f"router: not enough usable samples for a held-out split ({tally.summary()})")
    router = _fit(features["train"], num_experts, spec)
    report = _report(router, features, classes, num_experts, spec, train, held_out)
    report["seconds"] = time.monotonic() - started
    report["tally"] = tally.to_dict()
    from medtune.models.moe.layers import save_router

    with torch.no_grad():
        save_router(out_dir / ROUTER_FILE, router.weight.detach().clone(), router.bias.detach().clone())
    write_json(out_dir / REPORT_FILE, report)
    (out_dir / "router.md").write_text(report_markdown(report), encoding="utf-8")
    return report


def _label(sample, field: str) -> str | None:
    from medtune.models.kinds.base import metadata_value

    value = metadata_value(sample.meta, field)
    return None if value in (None, "") else str(value)


def split_by_image(items: list, held_out: float, seed: int) -> tuple[list, list]:
    """(train, held-out) with every sample of an image on one side; a text-only sample is its own group."""
    groups: dict[str, list] = {}
    for item in items:
        sample = item[0]
        key = "|".join(sorted(ref.path for ref in sample.images)) or f"id:{sample.id}"
        groups.setdefault(key, []).append(item)
    # order groups by a hash of their key: reproducible, and independent of the data file's order
    keys = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    cut = max(1, round(len(keys) * held_out)) if len(keys) > 1 else 0
    held = [item for key in keys[:cut] for item in groups[key]]
    kept = [item for key in keys[cut:] for item in groups[key]]
    return kept, held


def _features(vlm, items, classes, spec: RouterTraining, *, tally: Tally, strict: bool, skip_class) -> dict:
    """Hidden states at the FFN input of ``spec.layer``: per token (with its sample's row) or per sample mean."""
    import torch

    layers = vlm.decoder_layers()
    if spec.layer >= len(layers):
        raise RecipeError(f"router.layer: {spec.layer} is past the last decoder layer ({len(layers) - 1})")
    captured = []
    handle = layers[spec.layer].mlp.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    collate = vlm.collator()
    tokens, token_rows, sample_labels = [], [], []
    try:
        for start in range(0, len(items), BATCH):
            encoded, labels = [], []
            for sample, root, label in items[start:start + BATCH]:
                try:
                    encoded.append(vlm.encode_sample(sample, root, max_length=4096))
                except skip_class as skip:
                    if strict:
                        raise RecipeError(f"sample {sample.id}: {skip}") from None
                    tally.skip(skip.reason, f"{sample.id}: {skip}")
                    continue
                labels.append(classes.index(label))
            if not encoded:
                continue
            batch = collate(encoded)
            real = batch["attention_mask"].bool()
            captured.clear()
            with torch.no_grad():
                vlm.model(**{k: v.to(vlm.model.device) if hasattr(v, "to") else v for k, v in batch.items()})
            hidden = captured[0].float().cpu()
            for row, label in enumerate(labels):
                states = hidden[row][real[row]]
                if spec.pooling == "mean":
                    states = states.mean(0, keepdim=True)
                tokens.append(states)
                token_rows.append(torch.full((states.shape[0],), len(sample_labels), dtype=torch.long))
                sample_labels.append(label)
    finally:
        handle.remove()
    if not tokens:
        return {"x": torch.zeros(0, 1), "rows": torch.zeros(0, dtype=torch.long),
                "sample_labels": torch.zeros(0, dtype=torch.long)}
    labels = torch.tensor(sample_labels)
    rows = torch.cat(token_rows)
    return {"x": torch.cat(tokens), "rows": rows, "sample_labels": labels, "y": labels[rows]}


def _fit(features: dict, num_experts: int, spec: RouterTraining):
    """A Linear(hidden, experts) with bias, trained with Adam and cross-entropy on the examples, seeded.

    The classifier is fitted on standardised features (each hidden unit's train mean and std) and the
    standardisation is then folded into its weights and bias, so the saved router reads the raw hidden states the
    MoE layer feeds it: hidden units differ in scale by orders of magnitude, which plain gradient steps on the raw
    features would fit poorly.
    """
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    x, y = features["x"], features["y"]
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    standard = (x - mean) / std
    router = torch.nn.Linear(x.shape[1], num_experts, bias=True)
    with torch.no_grad():
        router.weight.normal_(0, 0.02, generator=generator)
        router.bias.zero_()
    optimizer = torch.optim.Adam(router.parameters(), lr=spec.lr)
    for _ in range(spec.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), TOKENS_PER_STEP):
            chosen = order[start:start + TOKENS_PER_STEP]
            loss = torch.nn.functional.cross_entropy(router(standard[chosen]), y[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():   # W (x - m) / s + b  =  (W / s) x + (b - (W / s) m)
        router.weight.div_(std)
        router.bias.sub_(router.weight @ mean)
    return router


def _report(router, features: dict, classes: list[str], num_experts: int, spec: RouterTraining, train, held_out) -> dict:
    import torch

    held = features["held_out"]
    with torch.no_grad():
        logits = router(held["x"])
    token_accuracy = float((logits.argmax(-1) == held["y"]).float().mean())
    sums = torch.zeros(len(held["sample_labels"]), num_experts).index_add_(0, held["rows"], logits)
    predicted = sums.argmax(-1)   # the mean of a sample's token logits has the same argmax as their sum
    truth = held["sample_labels"]
    confusion = [[int(((truth == t) & (predicted == p)).sum()) for p in range(num_experts)] for t in range(len(classes))]
    train_counts = Counter(features["train"]["sample_labels"].tolist())
    majority = max(train_counts, key=lambda c: (train_counts[c], -c))
    return {
        "label": spec.label, "classes": classes, "experts": num_experts,
        "expert_of": {name: index for index, name in enumerate(classes)}, "layer": spec.layer,
        "pooling": spec.pooling, "epochs": spec.epochs, "lr": spec.lr, "seed": spec.seed,
        "train": {"samples": len(features["train"]["sample_labels"]), "images": _images(train),
                  "examples": int(len(features["train"]["x"])),
                  "per_class": {classes[c]: n for c, n in sorted(train_counts.items())}},
        "held_out": {"samples": int(len(truth)), "images": _images(held_out), "examples": int(len(held["x"])),
                     "per_class": {classes[c]: int((truth == c).sum()) for c in range(len(classes))}},
        "accuracy": float((predicted == truth).float().mean()), "token_accuracy": token_accuracy,
        "majority_class": classes[majority], "majority_accuracy": float((truth == majority).float().mean()),
        "confusion": confusion,
    }


def _images(items) -> int:
    return len({ref.path for sample, _, _ in items for ref in sample.images})


def report_markdown(report: dict) -> str:
    experts = report["experts"]
    classes = report["classes"]
    lines = [
        f"# Domain router: {report['label']} -> expert", "",
        f"A Linear(hidden, {experts}) with bias on the FFN input of decoder layer {report['layer']} "
        f"({report['pooling']} examples), {report['epochs']} epochs of Adam at lr {report['lr']:g}. Held-out split "
        f"by image: {report['held_out']['samples']} samples on {report['held_out']['images']} images, none of them "
        f"seen in training ({report['train']['samples']} samples on {report['train']['images']} images).", "",
        "| held-out | accuracy |", "| --- | ---: |",
        f"| router (per sample) | {report['accuracy']:.1%} |",
        f"| router (per token) | {report['token_accuracy']:.1%} |",
        f"| majority class ({report['majority_class']}) | {report['majority_accuracy']:.1%} |", "",
        "Expert of each class: " + ", ".join(f"{name} -> {index}" for name, index in report["expert_of"].items())
        + (f"; experts {', '.join(str(e) for e in range(len(classes), experts))} have no class." if experts > len(classes)
           else "."), "",
        "Confusion (rows: true class, columns: predicted expert):", "",
        "| true \\ predicted | " + " | ".join(str(e) for e in range(experts)) + " |",
        "| --- |" + " ---: |" * experts,
    ]
    for name, row in zip(classes, report["confusion"]):
        lines.append(f"| {name} | " + " | ".join(str(n) for n in row) + " |")
    return "\n".join(lines) + "\n"


def read_report(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / REPORT_FILE).read_text(encoding="utf-8"))
