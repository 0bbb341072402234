"""`wren serve` against bad input (each a clear 4xx, the server keeps serving, the store stays valid) and pulls
from a .gguf file and from an Ollama store laid out here."""

from __future__ import annotations

import hashlib
import json
import socket

import httpx
import pytest

ollama = pytest.importorskip("ollama")
pytest.importorskip("uvicorn")

from test_server import Server  # noqa: E402
from wren.store import ModelStore  # noqa: E402


@pytest.fixture(scope="module")
def fake_ollama(tmp_path_factory, tiny):
    """An Ollama store on disk holding `fake:latest` (the tiny Gemma 3 GGUF), as Ollama lays it out."""
    root = tmp_path_factory.mktemp("ollama")
    (root / "blobs").mkdir()

    def blob(data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    model = blob(tiny["gemma3"][2].read_bytes())
    config = blob(json.dumps({"model_format": "gguf", "model_family": "gemma3", "file_type": "F32"}).encode())
    params = blob(json.dumps({"temperature": 0.5, "stop": ["<end_of_turn>"]}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", **model},
                           {"mediaType": "application/vnd.ollama.image.params", **params}]}
    path = root / "manifests" / "registry.ollama.ai" / "library" / "fake"
    path.mkdir(parents=True)
    (path / "latest").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def served(tiny, fake_ollama, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    store.pull(str(tiny["gemma3"][2]), name="tiny3")
    srv = Server(root, env={"OLLAMA_MODELS": str(fake_ollama)})
    yield srv, store
    srv.stop()


def post(srv, path, **kw):
    return httpx.post(srv.url + path, timeout=60, **kw)


def still_serving(srv, store):
    r = post(srv, "/api/generate", json={"model": "tiny3", "prompt": "ok", "stream": False,
                                         "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.json()["eval_count"] == 2
    assert "tiny3:latest" in {e.name for e in store.list()}
    store.resolve("tiny3")


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/show", "/api/create",
                                  "/api/pull", "/api/copy", "/v1/chat/completions", "/v1/embeddings"])
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'"text"', b'{"model": ' * 5000])
def test_malformed_json_is_400(served, path, body):
    srv, _ = served
    r = post(srv, path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["message"] if path.startswith("/v1/") else err)


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"model": 5, "prompt": "x"}),
    ("/api/generate", {"model": "tiny3", "prompt": 3}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "stream": "yes"}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "options": {"temperature": "hot"}}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "options": {"no_such_option": 1}}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "options": [1]}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "options": {"top_p": 7}}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "keep_alive": "forever"}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "format": 5}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "format": {"type": "frobnicate"}}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "context": ["a"]}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "images": ["aGVsbG8="]}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "think": True}),
    ("/api/chat", {"model": "tiny3", "messages": "hi"}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "options": {"kv_cache": "q7"}}),
    ("/api/generate", {"model": "tiny3", "prompt": "x", "options": {"kv_cache": 4}}),
    ("/api/chat", {"model": "tiny3", "messages": [{"content": "no role"}]}),
    ("/api/chat", {"model": "tiny3", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
    ("/api/chat", {"model": "tiny3", "messages": [{"role": "wizard", "content": "x"}]}),
    ("/api/chat", {"model": "tiny3", "messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]}),
    ("/api/embed", {"model": "tiny3", "input": [1, 2]}),
    ("/api/embed", {"model": "tiny3", "input": "x", "dimensions": 0}),
    ("/api/copy", {"source": "tiny3"}),
    ("/api/create", {"model": "new", "from": "tiny3", "quantize": "q4_K_M"}),
    ("/api/create", {"model": "new"}),
    ("/api/create", {"model": "new", "from": "tiny3", "parameters": {"temperature": "hot"}}),
    ("/v1/chat/completions", {"model": "tiny3", "messages": []}),
    ("/v1/chat/completions", {"model": "tiny3", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
    ("/v1/chat/completions", {"model": "tiny3", "messages": [{"role": "user", "content": "x"}], "n": 2}),
    ("/v1/chat/completions", {"model": "tiny3", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}),
    ("/v1/chat/completions", {"model": "tiny3", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "yaml"}}),
    ("/v1/completions", {"model": "tiny3", "prompt": ["a", "b"]}),
    ("/v1/embeddings", {"model": "tiny3", "input": [[999999]]}),
])
def test_wrong_types_and_values_are_400(served, path, body):
    srv, store = served
    r = post(srv, path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    message = err["message"] if path.startswith("/v1/") else err
    assert isinstance(message, str) and message
    if path.startswith("/v1/"):
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("name", ["nope", "nope:latest", "someone/nope:v2"])
def test_unknown_model_is_404(served, name):
    srv, _ = served
    for path, body in [("/api/generate", {"prompt": "x"}), ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/api/show", {}), ("/api/embed", {"input": "x"}), ("/api/embeddings", {"prompt": "x"})]:
        r = post(srv, path, json={"model": name, **body})
        assert r.status_code == 404 and "not found" in r.json()["error"], (path, r.text)
    r = httpx.request("DELETE", srv.url + "/api/delete", json={"model": name})
    assert r.status_code == 404
    assert post(srv, "/api/copy", json={"source": name, "destination": "x"}).status_code == 404
    r = post(srv, "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=srv.url).generate(model=name, prompt="x")
    assert err.value.status_code == 404


def test_too_long_prompt_is_400(served):
    srv, store = served
    long = "word " * 400
    r = post(srv, "/api/generate", json={"model": "tiny3", "prompt": long, "options": {"num_ctx": 64}})
    assert r.status_code == 400 and "context" in r.json()["error"]
    r = post(srv, "/v1/chat/completions", json={"model": "tiny3", "messages": [{"role": "user", "content": long * 3}]})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = post(srv, "/api/embed", json={"model": "tiny3", "input": long, "truncate": False, "options": {"num_ctx": 64}})
    assert r.status_code == 400
    still_serving(srv, store)


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/../../../b", "..", "x/./y", "/abs", "a:b:c", "a" * 300,
                                  "bad name", "ok\x00nul"])
def test_traversal_and_bad_names_are_4xx(served, name, tmp_path):
    srv, store = served
    before = sorted(p.name for p in store.root.parent.iterdir())
    checks = [post(srv, "/api/generate", json={"model": name, "prompt": "x"}),
              post(srv, "/api/show", json={"model": name}),
              post(srv, "/api/create", json={"model": name, "from": "tiny3"}),
              post(srv, "/api/copy", json={"source": "tiny3", "destination": name}),
              post(srv, "/api/copy", json={"source": name, "destination": "fine"}),
              httpx.request("DELETE", srv.url + "/api/delete", json={"model": name})]
    for r in checks:
        assert r.status_code in (400, 404), (r.request.url, r.text)
        assert r.json()["error"]
    assert sorted(p.name for p in store.root.parent.iterdir()) == before
    assert "fine:latest" not in {e.name for e in store.list()}
    still_serving(srv, store)


def _raw_upload(srv, digest: str, body: bytes, claimed: int) -> bytes:
    """An upload that declares `claimed` bytes, sends `body`, and hangs up."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {claimed}\r\n\r\n".encode() + body)
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(10)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except OSError:
        pass
    sock.close()
    return reply


def test_blob_upload_checks(served):
    srv, store = served
    data = b"some weights" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _raw_upload(srv, digest, data[:5000], len(data))  # cut off mid-body
    assert httpx.head(f"{srv.url}/api/blobs/{digest}").status_code == 404
    r = post(srv, f"/api/blobs/{digest}", content=data[:-1] + b"!")  # wrong bytes
    assert r.status_code == 400 and "does not match" in r.json()["error"]
    assert httpx.head(f"{srv.url}/api/blobs/{digest}").status_code == 404
    for bad in ("sha256:zz", "md5:" + "0" * 32, "sha256:" + "0" * 63, "..%2F..%2Fetc"):
        assert httpx.head(f"{srv.url}/api/blobs/{bad}").status_code in (400, 404)
        assert post(srv, f"/api/blobs/{bad}", content=b"x").status_code in (400, 404)
    assert post(srv, f"/api/blobs/{digest}", content=data).status_code == 201
    assert httpx.head(f"{srv.url}/api/blobs/{digest}").status_code == 200
    # a create that names an uploaded blob which is no GGUF
    r = post(srv, "/api/create", json={"model": "notgguf", "files": {"m.gguf": digest}, "stream": False})
    assert r.status_code == 400 and "GGUF" in r.json()["error"]
    still_serving(srv, store)


def test_corrupt_gguf_in_the_store(served, tiny):
    srv, store = served
    store.pull(str(tiny["gemma4-26b"][2]), name="broken")  # a blob no other model here shares
    blob = store.resolve("broken").model_path
    data = bytearray(blob.read_bytes())
    data[8:4096] = b"\xff" * (4096 - 8)  # a valid magic over garbage: the header no longer parses
    blob.unlink()  # replace the file (the blob may be a hard link shared with nothing else here)
    blob.write_bytes(bytes(data))
    r = post(srv, "/api/generate", json={"model": "broken", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"], r.text
    blob.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the manifest's size no longer matches
    r = post(srv, "/api/chat", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    assert post(srv, "/api/show", json={"model": "broken"}).status_code == 400
    assert httpx.request("DELETE", srv.url + "/api/delete", json={"model": "broken"}).status_code == 200
    still_serving(srv, store)


def test_unknown_route_and_method(served):
    srv, _ = served
    assert httpx.get(srv.url + "/api/nothing").status_code == 404
    assert httpx.get(srv.url + "/api/generate").status_code == 405
    assert httpx.get(srv.url + "/").text == "Wren is running"


def test_pull_from_gguf_and_from_an_ollama_store(served, tiny):
    srv, store = served
    c = ollama.Client(host=srv.url, timeout=120)
    steps = list(c.pull(str(tiny["gemma4-e2b"][2]), stream=True))
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    assert any(s.total for s in steps)
    assert "gemma4-e2b:latest" in {m.model for m in c.list().models}
    assert c.generate(model="gemma4-e2b", prompt="hi", options={"num_predict": 2}).eval_count == 2
    assert c.pull("ollama://fake:latest").status == "success"
    assert c.generate(model="fake", prompt="hi", options={"num_predict": 2}).eval_count == 2
    assert "temperature" in c.show("fake").parameters
    for missing in ("ollama://absent:latest", "/no/such/file.gguf", "library/gemma3:999b"):
        with pytest.raises(ollama.ResponseError) as err:
            c.pull(missing)
        assert err.value.status_code in (400, 404)
    with pytest.raises(ollama.ResponseError) as err:
        c.pull(str(tiny["gemma3"][1] / "config.json"))  # a file that is no GGUF
    assert err.value.status_code == 400
    still_serving(srv, store)


def test_host_settings_and_the_open_bind_warning(tmp_path):
    from wren.server.app import is_loopback, parse_host

    assert parse_host(None) == ("127.0.0.1", 11435)
    assert parse_host("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_host("http://[::1]:9000/") == ("::1", 9000)
    assert parse_host(":9001") == ("127.0.0.1", 9001)
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    srv = Server(tmp_path, "--host", "0.0.0.0")
    try:
        assert "warning" in srv.output() and "API key" in srv.output()
    finally:
        srv.stop()
    srv = Server(tmp_path, env={"WREN_HOST": "127.0.0.1:1"})  # --port given by the harness wins over WREN_HOST
    try:
        assert "warning" not in srv.output()
    finally:
        srv.stop()


def test_a_request_picks_its_kv_cache_and_ps_reports_it(served):
    srv, _ = served
    r = post(srv, "/api/generate", json={"model": "tiny3", "prompt": "hi", "stream": False,
                                         "options": {"kv_cache": "tq3/q8", "num_predict": 3, "num_ctx": 64}})
    assert r.status_code == 200, r.text
    entry = next(m for m in httpx.get(srv.url + "/api/ps").json()["models"] if m["name"] == "tiny3:latest")
    assert entry["kv_cache"] == "tq3/q8" and entry["kv_cache_bytes"] > 0


def test_failed_requests_left_no_model_in_use(served):
    """Every error path above released its hold on the model: keep_alive 0 unloads it at once."""
    srv, _ = served
    assert post(srv, "/api/generate", json={"model": "tiny3", "prompt": "", "keep_alive": 0}).json()["done_reason"] \
        == "unload"
    loaded = [m["name"] for m in httpx.get(srv.url + "/api/ps").json()["models"]]
    assert "tiny3:latest" not in loaded, loaded
