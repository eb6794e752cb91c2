"""The HTTP server on a real uvicorn at 127.0.0.1: OpenAI-compatible endpoints (httpx and the ``openai``
client), streaming, per-tenant keys (401/403), limits (400), a full queue (429), hot load/unload, metrics,
graceful shutdown, and a bounded load test (64 concurrent clients, zero lost, failed or crossed answers).

Every expected answer comes from HF ``generate`` with the adapter loaded alone by peftlab (greedy)."""
import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import peftlab
from peftlab.serve.cli import build_server

from models import randomize_adapters, save_tiny_model_dir, tiny_llama, tiny_tokenizer

NEW = 8
PROMPT = "hello there"
KEYS = {"tenants": {
    "acme": {"keys": ["sk-acme-0001"], "adapters": ["a0", "a1", "base"]},
    "beta": {"keys": ["sk-beta-0001"], "adapters": ["a2"]},
    "ops": {"keys": ["sk-ops-00001"], "adapters": "*", "admin": True},
}}
ADMIN = {"Authorization": "Bearer sk-ops-00001"}
ACME = {"Authorization": "Bearer sk-acme-0001"}


def _expected(adapter_dir, ids):
    model = tiny_llama()
    if adapter_dir is not None:
        peftlab.load_adapter(model, adapter_dir)
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, pad_token_id=2,
                         eos_token_id=2)
    return tiny_tokenizer().decode(out[0, len(ids):], skip_special_tokens=True)


class Server:
    def __init__(self, root, **overrides):
        import uvicorn

        options = dict(model=str(root / "model"), adapters={f"a{i}": root / "adapters" / f"a{i}" for i in range(3)},
                       adapter_root=root / "adapters", max_gpu_adapters=3, max_cpu_adapters=4,
                       api_keys=root / "keys.json", dtype="float32", device="cpu", max_batch=32, max_queue=256,
                       max_tokens=64, max_prompt_tokens=48, kv_tokens=8192, convert_rank=8)
        options.update(overrides)
        self.app, self.engine = build_server(**options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=30, timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_model_dir(root / "model")
    for i in range(4):  # a3 is the one loaded and unloaded while the server runs
        model = tiny_llama()
        peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model, seed=20 + i, std=0.6)
        peftlab.save_adapter(model, root / "adapters" / f"a{i}")
    (root / "keys.json").write_text(json.dumps(KEYS))
    return root


@pytest.fixture(scope="module")
def expected(root):
    ids = tiny_tokenizer()(PROMPT)["input_ids"]
    out = {"base": _expected(None, ids), **{f"a{i}": _expected(root / "adapters" / f"a{i}", ids) for i in range(4)}}
    assert len(set(out.values())) == len(out), f"adapters must answer distinctively: {out}"
    return out


@pytest.fixture(scope="module")
def server(root):
    srv = Server(root)
    yield srv
    srv.stop()


def _complete(client, model, headers=ACME, **kw):
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0, **kw}
    return client.post("/v1/completions", json=body, headers=headers)


def test_completions_per_adapter_and_models(server, expected):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for model in ("base", "a0", "a1"):
            r = _complete(c, "model" if model == "base" else model)  # the base model is served under its folder name
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected[model]
            assert r.json()["usage"]["completion_tokens"] >= len(expected[model]) > 0
        assert _complete(c, "base").json()["choices"][0]["text"] == expected["base"]  # the alias of the base model
        r = _complete(c, "a2", headers={"Authorization": "Bearer sk-beta-0001"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["a2"]
        ids = {m["id"] for m in c.get("/v1/models", headers=ACME).json()["data"]}
        assert ids == {"model", "a0", "a1"}


def test_auth_and_errors(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert _complete(c, "a0", headers={}).status_code == 401
        assert _complete(c, "a0", headers={"Authorization": "Bearer sk-wrong-000"}).status_code == 401
        r = _complete(c, "a2")  # beta's adapter with acme's key
        assert r.status_code == 403 and "not available" in r.json()["error"]["message"]
        assert c.post("/admin/adapters", json={"name": "x", "path": "a3"}, headers=ACME).status_code == 403
        assert _complete(c, "nope", headers=ADMIN).status_code == 404
        r = _complete(c, "a0", max_tokens=65)
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
        r = _complete(c, "a0", prompt="x" * 49)
        assert r.status_code == 400 and "over the limit of 48" in r.json()["error"]["message"]
        r = _complete(c, "a0", prompt="x" * (48 * 64 + 1))
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
        assert _complete(c, "a0", n=2).status_code == 400
        assert _complete(c, "a0", temperature=-1).status_code == 400
        assert _complete(c, "a0", top_p="high").status_code == 400
        assert c.post("/v1/completions", content=b"{not json", headers=ACME).status_code == 400
        r = c.post("/admin/adapters", json={"name": "evil", "path": "/etc"}, headers=ADMIN)
        assert r.status_code == 403 and "adapter root" in r.json()["error"]["message"]
        server.engine.config.max_queue = 0  # a full queue
        try:
            r = _complete(c, "a0")
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        finally:
            server.engine.config.max_queue = 256


def test_chat_streaming_with_openai_client(server, root):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-acme-0001", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    ids = tiny_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    want = _expected(root / "adapters" / "a1", list(ids))
    full = client.chat.completions.create(model="a1", messages=messages, max_tokens=NEW, temperature=0)
    assert full.choices[0].message.content == want
    parts_form = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    same = client.chat.completions.create(model="a1", messages=parts_form, max_tokens=NEW, temperature=0)
    assert same.choices[0].message.content == want
    parts = [ch.choices[0].delta.content or "" for ch in
             client.chat.completions.create(model="a1", messages=messages, max_tokens=NEW, temperature=0, stream=True)]
    assert "".join(parts) == want and len([p for p in parts if p]) > 1  # really streamed, token by token
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="a0", prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True))
    assert text == _expected(root / "adapters" / "a0", tiny_tokenizer()(PROMPT)["input_ids"])
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="a2", messages=messages, max_tokens=2)


def test_stop_string_and_metrics(server, expected):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        name = max(("a0", "a1"), key=lambda n: len(expected[n]))
        assert len(expected[name]) >= 4
        cut = expected[name][2:4]
        r = _complete(c, name, stop=cut)
        assert r.json()["choices"][0]["text"] == expected[name][:expected[name].find(cut)]
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert c.get("/health").json()["status"] == "ok"
        text = c.get("/metrics").text
        for name in ("queue_depth", "tokens_per_second", "adapter_gpu_hits_total", "adapter_slots_used"):
            assert f"peftlab_{name} " in text


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_load_test_with_hot_load_and_unload(server, root, expected, graphs):
    """64 concurrent clients over base + 3 adapters; an admin loads, uses and unloads a fourth meanwhile. ``graphs``:
    a second server whose decode steps run at fixed shapes (serve/graphs.py; captured only on CUDA), so slots change
    under them while requests run."""
    server = Server(root, cuda_graphs=True) if graphs else server
    try:
        _load_test(server, expected)
        assert not graphs or server.engine.graphs.steps_run > 0
    finally:
        if graphs:
            server.stop()


def _load_test(server, expected):
    async def client(c, i, results):
        model = ["model", "a0", "a1", "base-a2"][i % 4]
        headers = {"Authorization": "Bearer sk-beta-0001"} if model == "base-a2" else ACME
        model = "a2" if model == "base-a2" else model
        for _ in range(3):
            r = await c.post("/v1/completions", headers=headers, json={"model": model, "prompt": PROMPT,
                                                                       "max_tokens": NEW, "temperature": 0})
            results.append((model, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))

    async def admin(c, results):
        for _ in range(3):
            r = await c.post("/admin/adapters", json={"name": "a3", "path": str(server_root / "a3")}, headers=ADMIN)
            assert r.status_code == 200, r.text
            assert r.json()["peft_type"] == "LORA" and r.json()["converted_to_lora"] is False
            r = await c.post("/v1/completions", headers=ADMIN, json={"model": "a3", "prompt": PROMPT,
                                                                     "max_tokens": NEW, "temperature": 0})
            results.append(("a3", r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
            assert (await c.delete("/admin/adapters/a3", headers=ADMIN)).status_code == 200

    async def main():
        results = []
        # idle pooled connections expire well before the server's keep-alive ends (else a reuse can race the close)
        limits = httpx.Limits(max_connections=100, keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            await asyncio.gather(admin(c, results), *[client(c, i, results) for i in range(64)])
        return results

    server_root = server.engine.store.root
    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    assert len(results) == 64 * 3 + 3  # none lost
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:3]
    want = {"model": expected["base"], "a0": expected["a0"], "a1": expected["a1"], "a2": expected["a2"],
            "a3": expected["a3"]}
    crossed = [r for r in results if r[2] != want[r[0]]]
    assert not crossed, crossed[:3]
    assert elapsed < 60
    assert "a3" not in server.engine.store.names()


def test_graceful_shutdown_finishes_running_requests(root):
    srv = Server(root)
    got = {}
    step = srv.engine.step

    def slow_step():  # every step takes >= 20 ms, so the request is surely still running when shutdown starts
        time.sleep(0.02)
        return step()

    srv.engine.step = slow_step

    def long_request():
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            got["r"] = c.post("/v1/completions", headers=ACME, json={
                "model": "a0", "prompt": PROMPT, "max_tokens": 60, "temperature": 1.0, "seed": 3})

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 30
    while not srv.engine.metrics["requests_total"] and time.time() < deadline:
        time.sleep(0.002)
    assert srv.engine.metrics["requests_total"] == 1 and not got  # submitted, not answered: shut down now
    srv.stop()
    t.join(30)
    assert got["r"].status_code == 200
    assert got["r"].json()["usage"]["completion_tokens"] >= 1
    assert got["r"].json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert not srv.engine.accepting


def test_cli_options():
    import typer
    from typer.testing import CliRunner

    from peftlab.cli import app
    from peftlab.serve.cli import parse_adapter_specs

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--max-gpu-adapters" in result.output and "--api-keys" in result.output
    assert parse_adapter_specs(["a=x/y", "b=z"]) == {"a": Path("x/y"), "b": Path("z")}
    for bad in (["a"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(typer.BadParameter):
            parse_adapter_specs(bad)


def test_server_refuses_an_unservable_adapter_at_start(root, tmp_path):
    model = tiny_llama()
    peftlab.attach(model, peftlab.variants()["shadow"](["q_proj", "v_proj", "down_proj"], 4))  # hook-based, unbatched
    peftlab.save_adapter(model, tmp_path / "shadow")
    import typer

    with pytest.raises(typer.BadParameter, match="shadow.*model hooks"):
        Server(root, adapters={"bad": tmp_path / "shadow"})


def test_peftlab_serve_command_end_to_end(root, expected):
    """The real command in a subprocess: serves, answers, and exits cleanly on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", "--model", str(root / "model"), "--adapter",
                             f"a1={root / 'adapters' / 'a1'}", "--port", str(port), "--device", "cpu",
                             "--dtype", "float32", "--kv-tokens", "1024"], env=env, cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "a1", "prompt": PROMPT, "max_tokens": NEW,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["a1"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def test_keys_file_errors(tmp_path):
    from peftlab.serve.auth import AuthError, KeyRing

    path = tmp_path / "keys.json"
    with pytest.raises(ValueError, match="not found"):
        KeyRing.from_file(path)
    bad = {"{": "invalid JSON", json.dumps({"x": 1}): "expected",
           json.dumps({"tenants": {"t": {"keys": ["short"]}}}): "at least 8",
           json.dumps({"tenants": {"t": {"keys": ["sk-12345678"], "adapters": "all"}}}): "adapters",
           json.dumps({"tenants": {"t": {"keys": ["sk-12345678"], "role": "x"}}}): "allowed fields",
           json.dumps({"tenants": {"a": {"keys": ["sk-12345678"]}, "b": {"keys": ["sk-12345678"]}}}): "twice"}
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            KeyRing.from_file(path)
    path.write_text(json.dumps(KEYS))
    ring = KeyRing.from_file(path)
    tenant = ring.authenticate("Bearer sk-acme-0001")
    assert tenant.name == "acme" and tenant.allows("a0") and not tenant.allows("a2") and not tenant.admin
    for header in (None, "sk-acme-0001", "Bearer nope-nope-nope"):
        with pytest.raises(AuthError) as err:
            ring.authenticate(header)
        assert err.value.status == 401


def test_stream_decoder_holds_back_partial_characters_and_stop_prefixes():
    from peftlab.serve.api import Decoder
    from peftlab.serve.engine import Request

    pieces = {5: b"h", 6: b"\xc3", 7: b"\xa9", 8: b"!", 9: b"E", 10: b"N", 11: b"D"}

    class ByteTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    dec = Decoder(ByteTokenizer(), Request([1], stop_ids=frozenset({2})), stop=[])
    assert [dec.push(t) for t in (5, 6, 7, 2)] == ["h", "", "é", ""]  # é only once both bytes are there; eos hidden
    dec = Decoder(ByteTokenizer(), Request([1], stop_ids=frozenset({2})), stop=["END"])
    out = [dec.push(t) for t in (5, 6, 7, 8, 9, 10)]
    assert out[1] == "" and "".join(out) + dec.flush() == "hé!EN"  # é only once complete; "EN" held back, then flushed
    dec = Decoder(ByteTokenizer(), Request([1], stop_ids=frozenset({2})), stop=["END"])
    text = "".join(dec.push(t) for t in (5, 9, 10, 11, 8, 2)) + dec.flush()
    assert text == "h" and dec.reason == "stop"
