"""The API's batching worker with a fake Generator: waiting requests with equal settings are generated in one
call, others wait their turn in order, a failing request fails alone, and nothing is lost."""
import threading

import pytest

from medtune.models.generation import Completion, GenerationSettings
from medtune.serve.api import ApiError, BatchingWorker, ChatRequest


class FakeGenerator:
    """Answers each conversation with its last text; blocks the first call until released."""

    def __init__(self):
        self.calls: list[tuple[list[str], GenerationSettings]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.cancel_seen = threading.Event()   # a call that found its cancel event set when it ended

    def complete(self, conversations, images, settings, cancel=None, cancel_rows=None, prompts=None):
        self.started.set()
        self.release.wait(timeout=30)
        if cancel is not None and cancel.is_set():
            self.cancel_seen.set()
        questions = [c[-1]["content"][0]["text"] for c in conversations]
        self.calls.append((questions, settings))
        if any(q.startswith("boom") for q in questions):
            raise RuntimeError("the model cannot do this")
        return [Completion(f"answer to {q}", "stop", 1, 1) for q in questions]


def request(text: str, **settings) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": [{"type": "text", "text": text}]}], [],
                       GenerationSettings(**settings))


@pytest.fixture
def fake():
    return FakeGenerator()


def test_waiting_requests_with_equal_settings_share_one_call(fake):
    worker = BatchingWorker(fake, max_batch_size=4)
    first = worker.submit(request("q0"))
    assert fake.started.wait(10)  # the worker is busy with q0; the rest queue up behind it
    futures = [worker.submit(request(f"q{i}")) for i in range(1, 7)]
    odd = worker.submit(request("hot", temperature=0.7))
    fake.release.set()
    answers = [f.result(timeout=10).text for f in [first, *futures, odd]]
    worker.close()
    assert answers == [f"answer to q{i}" for i in range(7)] + ["answer to hot"]
    assert [questions for questions, _ in fake.calls] == [["q0"], ["q1", "q2", "q3", "q4"], ["q5", "q6"], ["hot"]]
    assert fake.calls[-1][1].temperature == 0.7 and all(s.greedy for _, s in fake.calls[:-1])


def test_other_settings_wait_in_arrival_order(fake):
    worker = BatchingWorker(fake, max_batch_size=8)
    worker.submit(request("q0"))
    assert fake.started.wait(10)
    order = ["a1", "b1", "a2", "b2"]
    futures = [worker.submit(request(name, max_new_tokens=5 if name[0] == "a" else 6)) for name in order]
    fake.release.set()
    assert [f.result(timeout=10).text for f in futures] == [f"answer to {n}" for n in order]
    worker.close()
    assert [questions for questions, _ in fake.calls] == [["q0"], ["a1", "a2"], ["b1", "b2"]]


def test_seeded_sampling_runs_alone(fake):
    worker = BatchingWorker(fake, max_batch_size=8)
    worker.submit(request("q0"))
    assert fake.started.wait(10)
    futures = [worker.submit(request(f"s{i}", temperature=1.0, seed=3)) for i in range(3)]
    fake.release.set()
    for f in futures:
        f.result(timeout=10)
    worker.close()
    assert [questions for questions, _ in fake.calls] == [["q0"], ["s0"], ["s1"], ["s2"]]


def test_a_failing_request_fails_alone(fake):
    worker = BatchingWorker(fake, max_batch_size=8)
    worker.submit(request("q0"))
    assert fake.started.wait(10)
    futures = {name: worker.submit(request(name)) for name in ("ok1", "boom", "ok2")}
    fake.release.set()
    assert futures["ok1"].result(timeout=10).text == "answer to ok1"
    assert futures["ok2"].result(timeout=10).text == "answer to ok2"
    with pytest.raises(ApiError) as caught:
        futures["boom"].result(timeout=10)
    worker.close()
    assert caught.value.status == 500 and caught.value.type == "server_error"
    assert "RuntimeError" in caught.value.message


def test_the_queue_is_bounded_and_the_overflow_refused_with_retry_after(fake):
    worker = BatchingWorker(fake, max_batch_size=8, max_queue=2)
    running = worker.submit(request("q0"))
    assert fake.started.wait(10)   # q0 is being generated: it no longer waits
    waiting = [worker.submit(request(f"q{i}")) for i in (1, 2)]
    for extra in ("q3", "q4"):
        with pytest.raises(ApiError) as refused:
            worker.submit(request(extra))
        assert refused.value.status == 503 and refused.value.code == "server_busy"
        assert int(refused.value.headers["Retry-After"]) >= 1
    assert (worker.waiting, worker.refused) == (2, 2)
    fake.release.set()
    assert [f.result(timeout=10).text for f in [running, *waiting]] == [f"answer to q{i}" for i in range(3)]
    assert worker.submit(request("q5")).result(timeout=10).text == "answer to q5"   # room again
    worker.close()
    assert worker.waiting == 0
    assert [questions for questions, _ in fake.calls] == [["q0"], ["q1", "q2"], ["q5"]]


def test_stop_cuts_the_running_batch_short_and_answers_every_request_left_with_503(fake):
    worker = BatchingWorker(fake, max_batch_size=1)
    running = worker.submit(request("q0"))
    assert fake.started.wait(10)
    waiting = worker.submit(request("q1"))
    worker.stop()
    fake.release.set()
    for future in (running, waiting):
        with pytest.raises(ApiError) as stopped:
            future.result(timeout=10)
        assert (stopped.value.status, stopped.value.code) == (503, "server_shutting_down")
    assert fake.cancel_seen.is_set()   # the generate call being run was told to end
    with pytest.raises(ApiError):
        worker.submit(request("q2"))
    worker.close()
    assert [questions for questions, _ in fake.calls] == [["q0"]]   # q1 was never generated
