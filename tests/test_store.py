"""The model store: pull (.gguf, HF folder, TurboQuant folder, an Ollama store), create, list/show/cp/rm with
blob garbage collection, hostile names and digests, corrupt blobs, interrupted writes, and `wren.load(NAME)` /
`wren run NAME` on a stored model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from wren.errors import BadOptionError, ModelFormatError, ModelNotFoundError
from wren.store import ModelStore, blobs, manifest

IDS = torch.tensor([[2, 40, 41, 42, 43]])


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("WREN_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.chdir(tmp_path)
    return ModelStore()


@pytest.fixture(scope="session")
def quantized(tiny, tmp_path_factory):
    import wren
    from wren.quant import folder

    model = wren.load(tiny["gemma3"][1])
    folder.quantize_model(model, 4, 0, 8)
    return folder.save(model, tmp_path_factory.mktemp("tq") / "g3-tq4")


def _logits(source):
    import wren

    with torch.no_grad():
        return wren.load(source)(IDS)


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- pull ---------------------------------------------------------------------------------------------------


def test_pull_gguf_lays_out_an_ollama_manifest(store, tiny):
    gguf = tiny["gemma3"][2]
    assert store.pull(str(gguf)) == "gemma3:latest"  # the name comes from the file
    r = store.resolve("gemma3")
    assert r.name == "gemma3:latest" and r.model_path == store.blob_path(_sha(gguf))
    assert r.model_path.read_bytes() == gguf.read_bytes()
    path = store.root / "manifests" / "wren.local" / "library" / "gemma3" / "latest"
    doc = json.loads(path.read_bytes())
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == manifest.MANIFEST_TYPE
    assert doc["config"]["mediaType"] == manifest.CONFIG_TYPE
    assert [layer["mediaType"] for layer in doc["layers"]] == [manifest.MODEL]
    assert r.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert r.details["format"] == "gguf" and r.details["family"] == "gemma3"
    assert r.details["quantization_level"] == "F32" and r.details["parameter_size"].endswith("K")
    assert torch.equal(_logits("gemma3:latest"), _logits(gguf))


def test_pull_hf_folder_links_blobs_into_a_folder(store, tiny):
    folder = tiny["gemma3"][1]
    assert store.pull(str(folder), "mine/g3-hf") == "mine/g3-hf:latest"
    r = store.resolve("mine/g3-hf")
    assert r.model_path.is_dir() and r.details["format"] == "safetensors" and r.details["family"] == "gemma3"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        linked = r.model_path / f
        assert linked.read_bytes() == (folder / f).read_bytes()
        assert os.path.samefile(linked, store.blob_path(_sha(folder / f)))  # a hard link, not a copy
    assert store.resolve("mine/g3-hf").model_path == r.model_path  # materialised once
    assert torch.equal(_logits("mine/g3-hf"), _logits(folder))


def test_pull_quantized_folder(store, quantized):
    name = store.pull(str(quantized))
    assert name == "g3-tq4:latest"
    r = store.resolve(name)
    assert r.details["quantization_level"] == "TQ4"
    assert torch.equal(_logits(name), _logits(quantized))


def _fake_ollama(root: Path, gguf: Path, name=("registry.ollama.ai", "library", "tiny", "q8")) -> dict:
    """An Ollama store laid out as Ollama writes it: manifest + sha256-named blobs."""
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    paths = {}

    def blob(data: bytes, media: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = root / "blobs" / f"sha256-{digest[7:]}"
        path.write_bytes(data)
        paths[media] = path
        return {"mediaType": media, "digest": digest, "size": len(data)}

    config = blob(json.dumps({"model_format": "gguf", "model_family": "gemma3", "model_families": ["gemma3"],
                              "model_type": "1.2M", "file_type": "F32"}).encode(), manifest.CONFIG_TYPE)
    layers = [blob(gguf.read_bytes(), manifest.MODEL),
              blob(b"{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}", manifest.TEMPLATE),
              blob(json.dumps({"stop": ["<end_of_turn>"], "temperature": 0.1, "num_gpu": 99}).encode(),
                   manifest.PARAMS),
              blob(b"Some licence", manifest.LICENSE)]
    raw = json.dumps({"schemaVersion": 2, "mediaType": manifest.MANIFEST_TYPE, "config": config,
                      "layers": layers}).encode()
    mpath = root.joinpath("manifests", *name)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_bytes(raw)
    return {"raw": raw, "blobs": paths}


def test_pull_from_an_ollama_store_hard_links(store, tiny, tmp_path):
    import wren

    fake = _fake_ollama(tmp_path / "ollama", tiny["gemma3"][2])
    assert store.pull("ollama://tiny:q8") == "tiny:q8"
    r = store.resolve("tiny:q8")
    for path in fake["blobs"].values():
        ours = store.blob_path("sha256:" + path.name[7:])
        assert ours.stat().st_ino == path.stat().st_ino  # linked, not copied
    assert r.digest == "sha256:" + hashlib.sha256(fake["raw"]).hexdigest()  # the manifest is kept as is
    assert r.parameters == {"stop": ["<end_of_turn>"], "temperature": 0.1}  # num_gpu means nothing to wren
    assert r.license == "Some licence" and r.template.startswith("{{ if .System")
    model = wren.load("tiny:q8")
    assert model.chat_template is None and any("Go" in n for n in model.notes)  # Go template not rendered
    assert model.defaults == {"stop": ["<end_of_turn>"], "temperature": 0.1}
    entry = next(e for e in store.list() if e.name == "tiny:q8")
    assert entry.details["family"] == "gemma3" and entry.details["parameter_size"] == "1.2M"


def test_pull_from_ollama_copies_across_devices(store, tiny, tmp_path, monkeypatch):
    fake = _fake_ollama(tmp_path / "ollama", tiny["gemma3"][2])
    monkeypatch.setattr(blobs, "link_into", lambda src, tmp_dir: None)  # as if on another device
    store.pull("ollama://tiny:q8", "copied")
    gguf = fake["blobs"][manifest.MODEL]
    ours = store.blob_path("sha256:" + gguf.name[7:])
    assert ours.stat().st_ino != gguf.stat().st_ino and ours.read_bytes() == gguf.read_bytes()


def test_ollama_errors(store, tiny, tmp_path):
    fake = _fake_ollama(tmp_path / "ollama", tiny["gemma3"][2])
    with pytest.raises(ModelNotFoundError, match="Ollama store"):
        store.pull("ollama://absent:1b")
    fake["blobs"][manifest.LICENSE].write_bytes(b"Tampered lic")  # same size, other bytes
    with pytest.raises(ModelFormatError, match="corrupt"):
        store.pull("ollama://tiny:q8")
    assert store.list() == [] and not list((store.root / "tmp").iterdir())


def test_store_reads_an_ollama_store_in_place(tiny, tmp_path):
    _fake_ollama(tmp_path / "ollama", tiny["gemma3"][2])
    st = ModelStore(tmp_path / "ollama")
    assert [e.name for e in st.list()] == ["tiny:q8"]
    assert st.resolve("tiny:q8").model_path.read_bytes() == tiny["gemma3"][2].read_bytes()


@pytest.mark.parametrize("source", ["gemma3:1b", "mine/tutor", "hf.co/google/gemma-3-270m", "http://example.com/m.gguf",
                                    "https://huggingface.co/google/gemma-3-270m", "registry.ollama.ai/library/gemma3"])
def test_remote_sources_fail_at_once(store, source):
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="no remote model registry"):
        store.pull(source)
    assert time.perf_counter() - t0 < 1.0


def test_pull_rejects_what_is_not_a_model(store, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        store.pull(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="config.json"):
        store.pull(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="no file or folder"):
        store.pull("./missing.gguf")
    assert store.list() == []


# --- create, list, show, cp, rm --------------------------------------------------------------------------------


def test_create_from_a_stored_model_inherits_and_overrides(store, tiny):
    store.pull(str(tiny["gemma3"][2]), "base")
    store.create("base", "FROM base\nSYSTEM Be brief.\nPARAMETER temperature 0.3\nPARAMETER stop a\nLICENSE L1")
    store.create("child", "FROM base\nPARAMETER top_k 5\nPARAMETER stop b\nLICENSE L2")
    base, child = store.resolve("base"), store.resolve("child")
    assert child.model_path == base.model_path and child.system == "Be brief."
    assert child.parameters == {"temperature": 0.3, "top_k": 5, "stop": ["b"]}
    assert child.license == "L1\n\nL2"


def test_create_from_uploaded_blobs(store, tiny):
    gguf = tiny["gemma3"][2]
    digest = _sha(gguf)
    store.put_blob(digest, blobs.read_chunks(gguf, 4096))
    assert store.has_blob(digest)
    assert store.create("uploaded", "FROM model.gguf\nSYSTEM hi", files={"model.gguf": digest}) == "uploaded:latest"
    assert store.resolve("uploaded").model_path == store.blob_path(digest)
    folder = tiny["gemma3"][1]
    files = {}
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        files[f] = _sha(folder / f)
        store.put_blob(files[f], [(folder / f).read_bytes()])
    store.create("uploaded-folder", "FROM .", files=files)
    r = store.resolve("uploaded-folder")
    assert r.details["format"] == "safetensors" and torch.equal(_logits("uploaded-folder"), _logits(folder))
    with pytest.raises(ModelNotFoundError, match="not uploaded"):
        store.create("x", "FROM m.gguf", files={"m.gguf": "sha256:" + "0" * 64})


def test_list_copy_delete_and_blob_gc(store, tiny):
    gguf, folder = tiny["gemma3"][2], tiny["gemma3"][1]
    store.pull(str(gguf), "a")
    store.pull(str(folder), "f")
    store.copy("a", "mine/b:v2")
    assert sorted(e.name for e in store.list()) == ["a:latest", "f:latest", "mine/b:v2"]
    entry = next(e for e in store.list() if e.name == "mine/b:v2")
    assert entry.size == gguf.stat().st_size and entry.digest == store.resolve("a").digest
    folder_path = store.resolve("f").model_path
    model_blob = store.blob_path(_sha(gguf))
    store.delete("a")
    assert model_blob.exists()  # mine/b:v2 still uses it
    store.delete("mine/b:v2")
    assert not model_blob.exists() and not (store.root / "manifests" / "wren.local" / "mine").exists()
    store.delete("f")
    assert not folder_path.exists() and not list(store.blobs_dir.iterdir())
    with pytest.raises(ModelNotFoundError):
        store.delete("f")
    with pytest.raises(ModelNotFoundError):
        store.resolve("f")


def test_overwriting_a_name_collects_the_old_blobs(store, tiny):
    store.pull(str(tiny["gemma3"][2]), "x")
    old = store.resolve("x").model_path
    store.pull(str(tiny["gemma4-e2b"][2]), "x")
    assert not old.exists() and store.resolve("x").details["family"] == "gemma4"


def test_prune_keeps_young_orphans_and_removes_old_ones(store, tiny, monkeypatch):
    store.pull(str(tiny["gemma3"][2]), "kept")
    data = b"an orphan"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.put_blob(digest, [data])
    assert store.prune() == [] and store.has_blob(digest)  # may belong to a create in progress
    later = time.time() + 7200
    monkeypatch.setattr(time, "time", lambda: later)  # two hours on (ctime cannot be set back)
    assert store.prune(grace=3600) == [digest] and not store.has_blob(digest)
    assert store.resolve("kept").model_path.exists()


# --- hostile names, digests and files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/../b", "/etc/passwd", "a/b/c/d", "x:..", "..", ".", "a\\b", "mine/.hid",
                                  "x y", "", "x:", ":tag", "a//b", "x:t/y", "model@sha256:00", "-lead", "h/n/m:t:u"])
def test_bad_names_are_refused(store, name):
    with pytest.raises(BadOptionError):
        store.resolve(name)
    with pytest.raises(BadOptionError):
        store.create(name, "FROM base")
    assert not (store.root / "manifests").exists()


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "sha256:" + "0" * 63,
                                    "md5:" + "0" * 32, "sha256-" + "0" * 64, "0" * 64, ""])
def test_bad_digests_are_refused(store, digest):
    for call in (store.blob_path, store.has_blob, lambda d: store.put_blob(d, [b"x"])):
        with pytest.raises(BadOptionError):
            call(digest)
    with pytest.raises(BadOptionError):
        store.create("x", "FROM model.gguf", files={"model.gguf": digest})


def test_hostile_manifests_are_refused(store, tiny):
    store.pull(str(tiny["gemma3"][1]), "f")
    path = store.root / "manifests" / "wren.local" / "library" / "f" / "latest"
    doc = json.loads(path.read_bytes())
    evil = json.loads(json.dumps(doc))
    evil["layers"][0]["annotations"][manifest.TITLE] = "../../escape"
    path.write_text(json.dumps(evil))
    with pytest.raises(ModelFormatError, match="relative path"):
        store.resolve("f")
    evil = json.loads(json.dumps(doc))
    evil["layers"][0]["digest"] = "sha256:../../../etc/passwd"
    path.write_text(json.dumps(evil))
    with pytest.raises(ModelFormatError, match="bad digest"):
        store.resolve("f")
    with pytest.raises(BadOptionError):
        store.create("y", "FROM .", files={"../x": doc["layers"][0]["digest"]})
    path.write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        store.resolve("f")
    assert store.list() == []  # listed models skip a corrupt manifest instead of failing


def test_corrupt_blobs_are_detected_and_healed(store, tiny):
    gguf = tiny["gemma3"][2]
    good = gguf.read_bytes()
    digest = _sha(gguf)
    with pytest.raises(BadOptionError, match="does not match"):
        store.put_blob(digest, [good[:-10]])  # truncated upload
    assert not store.has_blob(digest) and not list((store.root / "tmp").iterdir())
    store.pull(str(gguf), "m")
    with open(store.blob_path(digest), "r+b") as f:
        f.truncate(len(good) // 2)
    with pytest.raises(ModelFormatError, match="truncated"):
        store.resolve("m")
    assert [e.name for e in store.list()] == ["m:latest"]  # the store itself stays readable
    store.pull(str(gguf), "m")  # pulling again replaces the blob
    assert store.resolve("m").model_path.read_bytes() == good


# --- interruptions ----------------------------------------------------------------------------------------------


def test_ctrl_c_mid_pull_leaves_nothing(store, tiny, monkeypatch):
    monkeypatch.setattr(blobs, "CHUNK", 4096)

    def interrupt(done, total, label):
        if done > 8192:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.pull(str(tiny["gemma3"][2]), "m", progress=interrupt)
    assert store.list() == [] and not list((store.root / "tmp").iterdir())
    assert not store.blobs_dir.exists() or not list(store.blobs_dir.iterdir())


KILLER = """
import os, signal, sys
from wren.store import ModelStore, blobs
blobs.CHUNK = 4096
def progress(done, total, label):
    if done > 8192:
        os.kill(os.getpid(), signal.SIGKILL)
ModelStore(sys.argv[1]).pull(sys.argv[2], "m", progress=progress)
"""


def test_kill_9_mid_pull_then_the_next_run_cleans_up_and_completes(store, tiny):
    r = subprocess.run([sys.executable, "-c", KILLER, str(store.root), str(tiny["gemma3"][2])], timeout=120)
    assert r.returncode == -signal.SIGKILL
    debris = list((store.root / "tmp").iterdir())
    assert len(debris) == 1 and blobs.is_stale(debris[0])  # its writer is dead
    assert store.list() == []  # no manifest was written: the store is valid, just without the model
    with pytest.raises(ModelNotFoundError):
        store.resolve("m")
    assert store.pull(str(tiny["gemma3"][2]), "m") == "m:latest"
    assert not debris[0].exists() and store.resolve("m").model_path.read_bytes() == tiny["gemma3"][2].read_bytes()


def test_blobs_without_a_manifest_are_completed_by_the_next_run(store, tiny):
    gguf = tiny["gemma3"][2]
    store.put_blob(_sha(gguf), [gguf.read_bytes()])  # as if a pull died after its blobs, before the manifest
    ours = (store.root / "tmp")
    ours.mkdir(parents=True, exist_ok=True)
    mine = blobs.temp_path(ours)  # a temp file of a live writer (this process) is left alone
    mine.write_bytes(b"in flight")
    store.pull(str(gguf), "m")
    assert store.resolve("m").model_path == store.blob_path(_sha(gguf)) and mine.exists()


def test_a_manifest_is_only_written_when_its_blobs_exist(store, tiny):
    from wren.store.manifest import Layer, Manifest
    from wren.store.names import parse_name

    config = store.put_bytes(b"{}")
    missing = Layer(manifest.MODEL, "sha256:" + "1" * 64, 10)
    with pytest.raises(ModelFormatError, match="missing"):
        store._write_manifest(parse_name("m"), Manifest(Layer(manifest.CONFIG_TYPE, config.digest, 2), [missing]))
    assert store.list() == []


# --- the default model, wren.load and wren run ------------------------------------------------------------------


def test_default_model_is_registered_on_first_use(store):
    from wren.weights.load import DEFAULT_MODEL, default_model_path

    assert store.list() == []
    r = store.resolve(DEFAULT_MODEL)
    assert r.name == "gemma3:270m" and "Gemma Terms of Use" in r.license
    assert r.details["family"] == "gemma3" and r.details["quantization_level"] == "Q4_K_M"
    cached = default_model_path()
    if cached.stat().st_dev == r.model_path.stat().st_dev:
        assert os.path.samefile(cached, r.model_path)  # linked, not a second copy
    assert [e.name for e in store.list()] == ["gemma3:270m"]
    r.model_path.unlink()  # a lost blob (only the store's link: the cached file stays)
    assert store.resolve(DEFAULT_MODEL).model_path.stat().st_size == cached.stat().st_size


def _tutor(store, tiny) -> str:
    gguf = tiny["gemma3"][2]
    (Path.cwd() / "m").mkdir()
    (Path.cwd() / "m" / "w.gguf").write_bytes(gguf.read_bytes())
    (Path.cwd() / "m" / "Modelfile").write_text(
        'FROM ./w.gguf\nPARAMETER temperature 0\nPARAMETER top_k 7\nPARAMETER seed 3\nPARAMETER stop "zz"\n'
        'PARAMETER num_predict 4\nPARAMETER kv_cache tq4\nSYSTEM """Be kind."""\nMESSAGE user hello\n'
        "MESSAGE assistant hi\n")
    return store.create("tutor", (Path.cwd() / "m" / "Modelfile").read_text(), base_dir=Path.cwd() / "m")


def test_load_by_name_attaches_what_the_store_keeps(store, tiny):
    import wren

    _tutor(store, tiny)
    model = wren.load("tutor")
    assert model.store_name == "tutor:latest" and model.system == "Be kind." and model.kv_cache == "tq4"
    assert model.defaults == {"temperature": 0.0, "top_k": 7, "seed": 3, "stop": ["zz"], "num_predict": 4}
    assert model.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    with pytest.raises(ModelNotFoundError, match="wren list"):
        wren.load("absent-model")


def test_run_name_uses_stored_parameters_system_and_messages(store, tiny, monkeypatch, capsys):
    from wren import cli, generation

    _tutor(store, tiny)
    monkeypatch.setattr(cli.sys.stdin, "isatty", lambda: True)  # no piped prompt
    seen_opts, seen_prompts = [], []
    real_sampler, real_ids = generation.make_sampler, generation.prompt_ids
    monkeypatch.setattr(generation, "make_sampler", lambda o: seen_opts.append(o) or real_sampler(o))
    monkeypatch.setattr(generation, "prompt_ids",
                        lambda m, p, **kw: seen_prompts.append((p, kw)) or real_ids(m, p, **kw))
    assert cli.main(["run", "tutor", "what", "now"]) == 0
    opts = seen_opts[-1]
    assert (opts.temperature, opts.top_k, opts.stop, opts.num_predict) == (0.0, 7, ["zz"], 4)
    prompt, kw = seen_prompts[-1]
    assert kw["system"] == "Be kind."
    assert prompt == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                      {"role": "user", "content": "what now"}]
    assert cli.main(["run", "tutor", "again", "--top-k", "9"]) == 0
    assert seen_opts[-1].top_k == 9 and seen_opts[-1].temperature == 0.0  # a flag beats the stored value


def test_cli_store_commands(store, tiny, capsys, monkeypatch):
    from wren import cli

    gguf = str(tiny["gemma3"][2])
    assert cli.main(["pull", gguf, "c1", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "pulled c1:latest\n" and out.err == ""
    assert cli.main(["pull", gguf, "c2"]) == 0
    assert "gemma3.gguf" in capsys.readouterr().err  # progress, on stderr
    assert cli.main(["cp", "c1", "c3"]) == 0 and cli.main(["rm", "c2"]) == 0
    capsys.readouterr()
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"] and sorted(x.split()[0] for x in lines[1:]) == [
        "c1:latest", "c3:latest"]
    Path("Modelfile").write_text("FROM c1\nSYSTEM sys text\nTEMPLATE {{ messages }}\nPARAMETER top_p 0.5\n"
                                 "LICENSE lic text\n")
    assert cli.main(["create", "c4", "--quiet"]) == 0
    capsys.readouterr()
    for flag, text in [("--system", "sys text"), ("--template", "{{ messages }}"), ("--license", "lic text"),
                       ("--parameters", "top_p"), ("--modelfile", 'SYSTEM """sys text"""')]:
        assert cli.main(["show", "c4", flag]) == 0
        assert text in capsys.readouterr().out
    assert cli.main(["rm", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and len(err.splitlines()) == 1
    assert cli.main(["pull", "gemma3:1b"]) == 1
    assert "no remote model registry" in capsys.readouterr().err
    assert cli.main(["create", "c5", "-f", "absent"]) == 1
    assert "no Modelfile" in capsys.readouterr().err


def test_ps_with_and_without_a_server(monkeypatch, capsys):
    from wren import cli

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"models": [{"name": "tutor:latest", "digest": "ab" * 32, "size": 2_000_000,
                                           "size_vram": 0, "expires_at": "2999-01-01T00:00:00Z"}]}).encode()
            self.send_response(200 if self.path == "/api/ps" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WREN_HOST", f"127.0.0.1:{server.server_port}")
        assert cli.main(["ps"]) == 0
        out = capsys.readouterr().out
        assert "tutor:latest" in out and "abababababab" in out and "100% CPU" in out
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("WREN_HOST", f"127.0.0.1:{server.server_port}")  # nothing listens there now
    assert cli.main(["ps"]) == 1
    err = capsys.readouterr().err
    assert "no wren server answers" in err and len(err.splitlines()) == 1


def test_wren_run_name_through_the_command(store, tiny):
    _tutor(store, tiny)
    r = subprocess.run([sys.executable, "-m", "wren", "run", "tutor", "hello", "--verbose"], capture_output=True,
                       text=True, timeout=120, env=os.environ | {"WREN_MODELS": str(store.root)})
    assert r.returncode == 0, r.stderr
    assert "eval count:" in r.stderr and "Traceback" not in r.stderr


def test_progress_bar_draws_on_a_terminal_and_is_silent_when_quiet():
    import io

    from wren.store.commands import Bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Bar(stream=out)
    bar(50, 100, "model.gguf")
    bar(100, 100, "model.gguf")
    bar.finish()
    assert "model.gguf" in out.getvalue() and "100%" in out.getvalue() and out.getvalue().endswith("\n")
    quiet = Tty()
    Bar(quiet=True, stream=quiet)(1, 2, "x")
    assert quiet.getvalue() == ""


def test_default_model_falls_back_when_the_store_cannot_be_written(tmp_path, monkeypatch):
    from wren.store.hook import lookup

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("WREN_MODELS", str(tmp_path / "a-file" / "models"))
    assert lookup(None) is None  # wren.load() then opens the package's own copy


def test_go_templates_are_told_from_jinja():
    from wren.store.hook import is_go_template

    assert is_go_template("{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}")
    assert is_go_template("{{- range .Messages }}{{ .Content }}{{ end }}")
    assert not is_go_template("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ bos_token }}")
