"""Answer-prior baselines: what a model could score on a VQA test set without looking at the image.

A trained model's figures mean little on their own: on VQA-RAD, answering "yes" to every closed question
already gets about half of them right. The demo therefore scores two baselines on the same test questions,
with the same metrics, in the same run, both learned from the training split the model was trained on:

* ``majority``: the most frequent training answer of each answer type (closed, open), whatever the question.
* ``question_prior``: the most frequent training answer to the same question string, normalised (Unicode NFKC,
  case folded, whitespace collapsed; :func:`medtune.data.leakage.normalise`); a question never seen in
  training falls back to ``majority``. This is the text-only prior a VQA model can learn from the questions
  alone; after the leakage check removed exact test pairs from training, it still matches many test
  questions, because radiology questions repeat across images.

Design choices: answers are counted after the same normalisation (so "Yes" and "yes" are one answer), and the
normalised text is what the baseline predicts (both metric families lower-case anyway). Ties go to the answer
seen first in the training file, so the baselines are deterministic and do not depend on hash order.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from medtune.data.leakage import normalise
from medtune.data.schema import Sample

BASELINES = ("majority", "question_prior")


def _answer(sample: Sample) -> str | None:
    if sample.meta.answer is not None:
        return sample.meta.answer
    return next((m.text for m in sample.messages if m.role == "assistant"), None)


def _most_common(counts: Counter) -> str:
    # Counter.most_common orders equal counts by first insertion, i.e. by first appearance in training.
    return counts.most_common(1)[0][0]


@dataclass
class AnswerPriors:
    """Answer counts learned from a training split (see module docstring)."""

    by_type: dict[str, Counter] = field(default_factory=dict)
    by_question: dict[str, Counter] = field(default_factory=dict)
    samples: int = 0

    @classmethod
    def learn(cls, train: Iterable[Sample]) -> "AnswerPriors":
        priors = cls()
        for sample in train:
            answer, answer_type = _answer(sample), sample.meta.answer_type
            if answer is None or answer_type is None:
                continue   # nothing to learn from; counted by the reader that produced the sample
            priors.samples += 1
            answer = normalise(answer)
            priors.by_type.setdefault(answer_type, Counter())[answer] += 1
            priors.by_question.setdefault(normalise(sample.question), Counter())[answer] += 1
        if not priors.samples:
            raise ValueError("no training sample has an answer and an answer type to learn baselines from")
        return priors

    def majority(self, answer_type: str) -> str:
        """The most frequent training answer of this type ("" when training has none of the type)."""
        counts = self.by_type.get(answer_type)
        return _most_common(counts) if counts else ""

    def question_prior(self, question: str, answer_type: str) -> str:
        counts = self.by_question.get(normalise(question))
        return _most_common(counts) if counts else self.majority(answer_type)

    def predict(self, baseline: str, samples: Iterable[Sample]) -> dict[str, str]:
        """``{question id: answer}`` of one baseline for the test samples."""
        if baseline == "majority":
            return {s.id: self.majority(s.meta.answer_type) for s in samples}
        if baseline == "question_prior":
            return {s.id: self.question_prior(s.question, s.meta.answer_type) for s in samples}
        raise ValueError(f"unknown baseline {baseline!r} (expected one of {', '.join(BASELINES)})")

    def coverage(self, samples: Iterable[Sample]) -> int:
        """How many test questions ``question_prior`` answers from their own question (not the fallback)."""
        return sum(normalise(s.question) in self.by_question for s in samples)

    def describe(self) -> dict:
        return {"training_samples": self.samples,
                "majority": {t: self.majority(t) for t in sorted(self.by_type)},
                "distinct_questions": len(self.by_question)}
