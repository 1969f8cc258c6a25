"""Preference pairs from a model's own answers on a labelled set, for a DPO stage.

For every labelled question the model answered (a predictions file of ``medtune eval run``, or a LLaVA-Med /
Med-MoE answers file), the answer is scored with the strict metric family (:func:`medtune.eval.strict.score_item`:
yes/no read from the answer, the multiple-choice letter, the exact text of other closed answers, exact match
after normalisation for open ones). Where it is wrong, the question becomes a preference pair: the chosen reply
is the reference answer (the labelled conversation's last reply, else its metadata answer), the rejected reply
the model's answer (:attr:`medtune.data.schema.Sample.rejected`). Questions answered right, not answered, or
answered with nothing are counted by reason, never silently dropped.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator

from medtune.data.schema import Message, Part, Sample
from medtune.eval.strict import score_item

REASONS = ("answered right", "no prediction", "empty prediction", "no reference answer")


def preference_pairs(samples: Iterable[Sample], predictions: dict[str, str], counts: Counter) -> Iterator[Sample]:
    """The pairs of ``samples`` the model answered wrong; ``counts`` gets one count per question by outcome
    (``pairs`` or one of :data:`REASONS`)."""
    for sample in samples:
        prompt, truth = _prompt_and_truth(sample)
        prediction = predictions.get(sample.id)
        if truth is None:
            counts["no reference answer"] += 1
        elif prediction is None:
            counts["no prediction"] += 1
        elif not prediction.strip():
            counts["empty prediction"] += 1
        elif _right(prediction, truth, sample):
            counts["answered right"] += 1
        else:
            counts["pairs"] += 1
            yield Sample(id=sample.id, messages=[*prompt, _reply(truth)], meta=sample.meta,
                         rejected=_reply(prediction.strip()))


def _prompt_and_truth(sample: Sample) -> tuple[list[Message], str | None]:
    if sample.messages[-1].role == "assistant":
        return sample.messages[:-1], sample.messages[-1].text or sample.meta.answer
    return sample.messages, sample.meta.answer


def _right(prediction: str, truth: str, sample: Sample) -> bool:
    answer_type = sample.meta.answer_type if sample.meta.answer_type in ("closed", "open", "mcq") else "open"
    scores = score_item(prediction, truth, answer_type, sample.meta.choices)
    return bool(scores.get("accuracy", scores.get("exact", 0.0)))


def _reply(text: str) -> Message:
    return Message("assistant", (Part.of_text(text),))
