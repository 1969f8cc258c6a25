"""`medtune serve` under more requests than its queue holds, as a real subprocess: the overflow is refused at
once with 503 and Retry-After, everything admitted is answered, and the server stays up. The server is started
on a checkpoint folder named ``model`` inside a run folder, as a stage or the demo writes it, and without
``--model-name``: the id it serves is the run's name.
"""
import concurrent.futures

import pytest

from serve_helpers import free_port, start_medtune, stop

httpx = pytest.importorskip("httpx")

MAX_QUEUE = 2
CONCURRENT = 10
# Long answers keep the one running request busy (about a second on one core for the tiny model) while the
# others arrive, so the queue fills and the rest overflow; prompt and answer fit the model's 1,024 positions.
SLOW = {"temperature": 0, "max_tokens": 900,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Is there a fracture?"}]}]}


@pytest.fixture(scope="module")
def run_model(tiny_model_dir, tmp_path_factory):
    """``RUN/model``: the checkpoint under the generic folder name medtune's stages and demo give it."""
    run = tmp_path_factory.mktemp("names") / "demo-run"
    run.mkdir()
    (run / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    return run / "model"


@pytest.fixture(scope="module")
def busy_server(run_model):
    port = free_port()
    process = start_medtune(["serve", str(run_model), "--host", "127.0.0.1", "--port", str(port),
                             "--max-queue", str(MAX_QUEUE), "--max-batch-size", "1", "--max-tokens-limit", "1024"],
                            f"http://127.0.0.1:{port}/health")
    yield {"url": f"http://127.0.0.1:{port}", "process": process}
    stop(process)


def test_served_model_id_is_the_checkpoint_name(busy_server):
    models = httpx.get(busy_server["url"] + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["demo-run"]


def test_overflow_is_refused_with_retry_after_and_the_rest_answered(busy_server):
    url = busy_server["url"] + "/v1/chat/completions"
    body = {**SLOW, "model": "demo-run"}

    def send(_):
        return httpx.post(url, json=body, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        responses = list(pool.map(send, range(CONCURRENT)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    answered = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    # MAX_QUEUE places at least (a place is taken on arrival and given back when the worker takes the request,
    # so whether the first request left the queue before the burst filled it is timing: MAX_QUEUE or one more);
    # the arrivals overflow while the first answer is generated
    assert len(answered) >= MAX_QUEUE and refused, statuses
    for response in answered:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_busy"
        assert f"{MAX_QUEUE} requests are waiting" in error["message"]
    health = httpx.get(busy_server["url"] + "/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0
    assert health["max_queue"] == MAX_QUEUE and health["refused"] == len(refused)
    assert busy_server["process"].poll() is None
    # refusal is temporary: once the queue has drained the same request is answered
    again = httpx.post(url, json={**body, "max_tokens": 4}, timeout=300)
    assert again.status_code == 200, again.text


def test_cli_refuses_a_queue_bound_below_one(run_model, capsys):
    from medtune.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", str(run_model), "--max-queue", "0"])
    assert exited.value.code == 2
    assert "--max-queue: must be a positive integer, got 0" in capsys.readouterr().err
