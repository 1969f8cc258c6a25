"""The whole bundled VQA-RAD test split through the local backend and through a real `medtune serve`.

The server runs as a subprocess on 127.0.0.1 with the same checkpoint and one compute thread, like this
process. The HTTP backend keeps 8 requests in flight and the server micro-batches whatever is waiting, so its
batches differ from the local run's (grouped by settings, 8 at a time) and change with timing. Greedy answers
must still be identical, id by id, and so must every metric: the Generator pads on the left, so an answer does
not depend on which other questions share its batch.
"""
import json

import pytest

from medtune.cli import main
from medtune.eval.backends import LocalBackend
from medtune.eval.run import run_task
from medtune.eval.score import score_predictions
from medtune.eval.tasks import get_task
from run_helpers import answering_model, predictions, report_rows
from serve_helpers import free_port, start_medtune, stop

torch = pytest.importorskip("torch")
pytest.importorskip("httpx")

VQA_RAD_TEST_QUESTIONS = 451


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)  # as the server subprocess (serve_helpers.SUBPROCESS_ENV)
    return answering_model(tmp_path_factory.mktemp("models") / "answering-tiny")


@pytest.fixture(scope="module")
def server_url(model_dir):
    port = free_port()
    process = start_medtune(["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--model-name", "tiny", "--max-batch-size", "8"], f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}/v1"
    stop(process)


@pytest.mark.slow
def test_local_and_http_backends_give_identical_predictions_and_metrics(model_dir, server_url, tmp_path, capsys):
    from medtune.models.build import load_vlm

    local = tmp_path / "local"
    result = run_task(get_task("vqa-rad"), LocalBackend(load_vlm(model_dir)), local, batch_size=8, progress=False)
    assert result.answered == VQA_RAD_TEST_QUESTIONS

    http = tmp_path / "http"
    assert main(["eval", "run", "--task", "vqa-rad", "--endpoint", server_url, "--batch-size", "8",
                 "--out", str(http)]) == 0
    assert f"{VQA_RAD_TEST_QUESTIONS} answered now" in capsys.readouterr().out
    backends = {json.loads(line)["backend"] for line in (http / "predictions.jsonl").read_text().splitlines()}
    assert backends == {f"http:{server_url}#tiny"}

    local_predictions, http_predictions = predictions(local), predictions(http)
    differing = [i for i in local_predictions if local_predictions[i] != http_predictions.get(i)]
    assert not differing, f"{len(differing)} answers differ, e.g. {differing[:3]}"
    assert set(http_predictions) == set(local_predictions)
    assert len({r["prediction"] for r in local_predictions.values()}) > 20  # the answers are not all alike
    assert report_rows(http) == report_rows(local)

    # the run's report is what `medtune eval score` of its predictions file gives
    rescored = score_predictions(get_task("vqa-rad"), http / "predictions.jsonl")
    assert [row.to_dict() for row in rescored.rows] == report_rows(http)


def test_http_backend_encodes_a_repeated_image_once(monkeypatch):
    """Questions about one image (the runner hands the same PIL object) share one PNG encoding, same bytes."""
    import httpx
    from PIL import Image

    from medtune.eval import backends

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        sent.append(json.loads(request.content)["messages"][0]["content"][0]["image_url"]["url"])
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "yes"}}]})

    encoded = []
    monkeypatch.setattr(backends, "image_data_uri", lambda image: encoded.append(image) or f"data:{id(image)}")
    backend = backends.HTTPBackend("http://x", transport=httpx.MockTransport(handler), concurrency=1)
    first, second = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "red")
    requests = [backends.Request(str(i), [{"role": "user", "content": [{"type": "image", "image": image},
                                                                       {"type": "text", "text": "q"}]}])
                for i, image in enumerate([first, first, second, first])]
    assert backend.answer(requests) == ["yes"] * 4
    assert encoded == [first, second]
    assert sent == [f"data:{id(first)}"] * 2 + [f"data:{id(second)}", f"data:{id(first)}"]
