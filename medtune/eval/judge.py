"""An LLM judge for open answers, through any OpenAI-compatible chat-completions endpoint (off by default).

Open answers are free text; exact match undercounts ("left lung" vs "the left lower lobe"), token metrics
overcount. A judge model reads the question, the reference and the candidate and answers CORRECT or
INCORRECT. Choices:

* Plain ``httpx`` against ``{base_url}/chat/completions``: vLLM, SGLang, ``medtune serve`` and hosted APIs all
  speak it. Greedy (temperature 0) so a rerun gives the same verdicts where the server is deterministic.
* Every prompt and raw reply is kept (:attr:`Judge.records`, written to ``judge.jsonl`` by the report), so a
  verdict can be checked by a person.
* A reply that is neither CORRECT nor INCORRECT is *unparsed*: it scores 0 and stays in the denominator, and
  the count is reported as the ``unparsed`` metric. Dropping such items would flatter the model.
* Connection errors, timeouts, 429 and 5xx are retried with back-off; anything else stops the run with the
  server's message (scoring with a broken judge would be silently wrong).
* The prompt, the verdict parser and the reply budget are fields, so a family with its own judging rules
  (``medmax``: a "Correctness: 1/0" line) uses the same client through :meth:`Judge.variant`; every record
  names the family whose rules made it.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

PROMPT = """You are grading an answer to a question about a medical image.
Question: {question}
Reference answer: {answer}
Candidate answer: {prediction}
Does the candidate answer mean the same as the reference answer? Reply with exactly one word: CORRECT or INCORRECT."""
_INCORRECT = re.compile(r"\bINCORRECT\b", re.IGNORECASE)
_CORRECT = re.compile(r"\bCORRECT\b", re.IGNORECASE)
_RETRY_STATUS = {429, 500, 502, 503, 504}
JUDGE_KEY_ENV = "MEDTUNE_JUDGE_API_KEY"   # the judge endpoint's API key, never written in a file


class JudgeError(RuntimeError):
    """The judge endpoint could not be used (after retries, where they apply)."""


def parse_verdict(reply: str) -> float | None:
    """1.0 for CORRECT, 0.0 for INCORRECT, None when the reply says neither (or both)."""
    says_incorrect = bool(_INCORRECT.search(reply))
    says_correct = bool(_CORRECT.search(_INCORRECT.sub(" ", reply)))
    if says_incorrect == says_correct:
        return None
    return 1.0 if says_correct else 0.0


@dataclass
class Judge:
    """Calls ``model`` at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``) once per open item."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    answer_types: tuple[str, ...] = ("open",)
    transport: Any = None  # an httpx transport; tests pass httpx.MockTransport
    records: list[dict] = field(default_factory=list)
    prompt: str = PROMPT
    """Filled with ``question``, ``answer`` and ``prediction``."""
    parse: Callable[[str], float | None] = parse_verdict
    """A reply to 1.0 (right), 0.0 (wrong) or None (unparsed)."""
    max_tokens: int = 8
    family: str = "judge"
    """The metric family whose rules these are; written into every record."""

    def variant(self, **rules) -> "Judge":
        """The same endpoint with other judging rules (prompt, parse, max_tokens, family); the records list
        is shared, so one ``judge.jsonl`` holds every verdict of a scoring run."""
        return replace(self, records=self.records, **rules)

    def verdicts(self, items: list) -> dict[str, float | None]:
        """``{item id: 1.0 | 0.0 | None}`` for the items of :attr:`answer_types`, one call each."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        out: dict[str, float | None] = {}
        with httpx.Client(base_url=self.base_url.rstrip("/") + "/", headers=headers, timeout=self.timeout,
                          transport=self.transport) as client:
            for item in items:
                if item.answer_type not in self.answer_types:
                    continue
                prompt = self.prompt.format(question=item.question, answer=item.answer, prediction=item.prediction)
                reply = self._complete(client, prompt)
                verdict = self.parse(reply)
                self.records.append({"id": item.id, "family": self.family, "prompt": prompt, "reply": reply,
                                     "verdict": verdict})
                out[item.id] = verdict
        return out

    def score(self, items: list) -> dict[str, dict]:
        """``{item id: {"accuracy": 0|1, "unparsed": 0|1}}`` for the items of :attr:`answer_types`."""
        verdicts = self.verdicts(items)
        return {item.id: {"accuracy": verdicts[item.id] or 0.0, "unparsed": float(verdicts[item.id] is None)}
                if item.id in verdicts else {} for item in items}

    def _complete(self, client, prompt: str) -> str:
        import httpx

        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": 0.0, "max_tokens": self.max_tokens}
        for attempt in range(self.retries + 1):
            try:
                response = client.post("chat/completions", json=payload)
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return _reply_text(response.json())
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in _RETRY_STATUS:
                    raise JudgeError(f"judge endpoint {self.base_url} refused the request ({problem})")
            if attempt < self.retries:
                time.sleep(min(2 ** attempt * 0.5, 8))
        raise JudgeError(f"judge endpoint {self.base_url} failed after {self.retries + 1} attempts ({problem})")


def _reply_text(body: dict) -> str:
    try:
        return body["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as error:
        raise JudgeError(f"judge endpoint returned no chat completion ({error!r}: {str(body)[:200]})") from None
