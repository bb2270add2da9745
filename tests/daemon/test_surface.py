"""Ollama's model-management surface over a real registry: version, HEAD, copy, create with
system/parameters (stored, shown, applied), unknown options, push and blobs."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil

import ollama
import pytest
from fakes import fake_config
from harness import DaemonThread, ollama_over_socket, openai_over_socket
from krasis_registry import Registry
from krasis_registry.create import bundled_dir

from krasisd import __version__
from krasisd.routes_models import _expires_at, parameters_text

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fake_env):
    root = tmp_path_factory.mktemp("surface")
    cfg = fake_config(root)
    registry = Registry(cfg.home, quant="none")
    list(registry.pull("krasis-tiny"))
    thread = DaemonThread(cfg, registry).start()
    thread.folder = root / "folder"
    shutil.copytree(bundled_dir("krasis-tiny"), thread.folder)
    yield thread
    thread.close()
    registry.close()


@pytest.fixture(scope="module")
def http(daemon):
    with daemon.client() as client:
        yield client


@pytest.fixture(scope="module")
def ollama_client(daemon):
    return ollama_over_socket(daemon.socket_path)


@pytest.fixture(scope="module")
def openai_client(daemon):
    return openai_over_socket(daemon.socket_path)


@pytest.fixture(scope="module")
def pirate(ollama_client):
    """A model derived from krasis-tiny with a system message and default options."""
    done = ollama_client.create(model="pirate", from_="krasis-tiny", system="talk like a pirate",
                                parameters={"num_predict": 3, "stop": ["ARR", "yo ho"],
                                            "temperature": 0.5})
    assert done.status == "success"
    return "pirate"


# ------------------------------------------------------------------ version and HEAD

def test_version_is_one_ollama_clients_accept(http):
    body = http.get("/api/version").json()
    assert tuple(int(p) for p in body["version"].split(".")) >= (0, 6, 4)  # VS Code Copilot
    assert body["krasis_version"] == __version__


@pytest.mark.parametrize("path", ["/", "/api/version", "/api/tags"])
def test_head_where_ollama_has_it(http, path):
    answer = http.head(path)
    assert answer.status_code == 200 and answer.content == b""
    assert answer.headers["Content-Length"] == str(len(http.get(path).content))


def test_head_ps_is_not_a_route(http):
    assert http.head("/api/ps").status_code == 405  # Ollama has GET /api/ps only


# ------------------------------------------------------------------ copy

def test_copy_shares_the_files(ollama_client, http):
    assert ollama_client.copy("krasis-tiny", "tiny-copy:v1").status == "success"
    names = [m.model for m in ollama_client.list().models]
    assert "tiny-copy:v1" in names and "krasis-tiny:latest" in names
    src, dst = ollama_client.show("krasis-tiny"), ollama_client.show("tiny-copy:v1")
    assert dst.modelinfo == src.modelinfo
    src_files = http.post("/api/show", json={"model": "krasis-tiny"}).json()
    dst_files = http.post("/api/show", json={"model": "tiny-copy:v1"}).json()
    assert dst_files["digest"] == src_files["digest"]
    assert dst_files["path"] != src_files["path"]
    import os
    for row in src_files["files"]:
        a = os.stat(os.path.join(src_files["path"], row["path"]))
        b = os.stat(os.path.join(dst_files["path"], row["path"]))
        assert a.st_ino == b.st_ino  # a hard link: no second copy of the weights
    answer = ollama_client.generate(model="tiny-copy:v1", prompt="hi",
                                    options={"num_predict": 2})
    assert answer.eval_count == 2


def test_copy_errors(ollama_client, http):
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.copy("no-such-model", "whatever")
    assert info.value.status_code == 404 and "not found" in info.value.error
    ollama_client.copy("krasis-tiny", "taken")
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.copy("krasis-tiny", "taken")
    assert info.value.status_code == 400 and "already exists" in info.value.error
    answer = http.post("/api/copy", json={"source": "krasis-tiny"})
    assert answer.status_code == 400 and answer.json() == {"error": "missing field 'destination'"}
    answer = http.post("/api/copy", json={"source": "krasis-tiny", "destination": "../x"})
    assert answer.status_code == 400 and "invalid model name" in answer.json()["error"]
    answer = http.post("/api/copy", json={"source": "krasis-tiny", "destination": "kimi-k2"})
    assert answer.status_code == 400 and "reserved" in answer.json()["error"]


# ------------------------------------------------------------------ create: system, parameters

def _system(http, model):
    """/api/show's system (Ollama answers it; the ollama package's ShowResponse lacks it)."""
    return http.post("/api/show", json={"model": model}).json()["system"]


def test_show_has_system_and_parameters(ollama_client, pirate, http):
    shown = ollama_client.show(pirate)
    assert _system(http, pirate) == "talk like a pirate"
    assert shown.parameters.splitlines() == [
        f"{'num_predict':<30} 3", f"{'stop':<30} \"ARR\"", f"{'stop':<30} \"yo ho\"",
        f"{'temperature':<30} 0.5"]
    assert 'SYSTEM """talk like a pirate"""' in shown.modelfile
    assert shown.template == ""
    body = http.post("/api/show", json={"model": pirate}).json()
    assert body["options"] == {"num_predict": 3, "stop": ["ARR", "yo ho"], "temperature": 0.5}


def test_parameters_text_form():
    assert parameters_text({"num_ctx": 4096.0, "stop": ['say "hi"'], "top_p": 0.9}) == (
        f"{'num_ctx':<30} 4096\n{'stop':<30} \"say \\\"hi\\\"\"\n{'top_p':<30} 0.9")
    assert parameters_text({}) == ""


def test_model_defaults_apply_to_generate(ollama_client, pirate):
    answer = ollama_client.generate(model=pirate, prompt="hi")
    assert answer.response.startswith("[<system>talk like a pirate<user>hi<assistant>]")
    assert answer.eval_count == 3  # the model's num_predict
    answer = ollama_client.generate(model=pirate, prompt="hi", system="be brief",
                                    options={"num_predict": 5})
    assert answer.response.startswith("[<system>be brief<user>hi<assistant>]")
    assert answer.eval_count == 5  # the request's own options win
    answer = ollama_client.generate(model=pirate, prompt="as is", raw=True)
    assert answer.response.startswith("[as is]") and answer.eval_count == 3


def test_model_defaults_apply_to_chat(ollama_client, openai_client, pirate):
    answer = ollama_client.chat(model=pirate, messages=[{"role": "user", "content": "q"}])
    assert answer.message.content.startswith("[<system>talk like a pirate<user>q<assistant>]")
    assert answer.eval_count == 3
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    answer = ollama_client.chat(model=pirate, messages=own)
    assert answer.message.content.startswith("[<system>mine<user>q<assistant>]")
    done = openai_client.chat.completions.create(
        model=pirate, messages=[{"role": "user", "content": "q"}])
    assert done.choices[0].message.content.startswith("[<system>talk like a pirate<user>q")
    assert done.usage.completion_tokens == 3  # the model's num_predict over OpenAI's default
    done = openai_client.chat.completions.create(
        model=pirate, messages=[{"role": "user", "content": "q"}], max_tokens=4)
    assert done.usage.completion_tokens == 4
    done = openai_client.completions.create(model=pirate, prompt="p")
    assert done.choices[0].text.startswith("[p]")  # raw: no system message
    assert done.usage.completion_tokens == 3  # over OpenAI's max_tokens default of 16


def test_derived_model_keeps_or_replaces_defaults(ollama_client, pirate, http):
    ollama_client.create(model="pirate-kept", from_=pirate)
    assert _system(http, "pirate-kept") == "talk like a pirate"
    ollama_client.create(model="parrot", from_=pirate, system="squawk",
                         parameters={"num_predict": 1})
    shown = ollama_client.show("parrot")
    assert _system(http, "parrot") == "squawk"
    assert shown.parameters == f"{'num_predict':<30} 1"
    assert _system(http, pirate) == "talk like a pirate"
    answer = http.post("/api/create", json={"model": "orphan", "from": "no-such-model"})
    assert answer.status_code == 404 and "not found" in answer.json()["error"]


def test_create_from_folder_with_defaults(daemon, http, ollama_client):
    answer = http.post("/api/create", json={
        "model": "from-folder", "path": str(daemon.folder), "system": "folder system",
        "parameters": {"num_predict": 2}, "stream": False})
    assert answer.status_code == 200 and answer.json() == {"status": "success"}
    shown = ollama_client.show("from-folder")
    assert _system(http, "from-folder") == "folder system"
    assert shown.parameters == f"{'num_predict':<30} 2"
    assert ollama_client.generate(model="from-folder", prompt="x").eval_count == 2


@pytest.mark.parametrize(("field", "value", "message"), [
    ("template", "{{ .Prompt }}", "'template' is not supported: krasis renders prompts"),
    ("files", {"model.gguf": "sha256:00"}, "give one of 'files' (uploaded blobs), 'path' or"),
    ("adapters", {"a": "sha256:00"}, "'adapters' is not supported"),
    ("quantize", "q4_K_M", "'quantize' is not supported"),
    ("modelfile", "FROM x", "'modelfile' is not supported"),
    ("parameters", {"top_p": 2}, "invalid options: top_p must be in (0, 1]"),
    ("parameters", {"num_ctx": "big"}, "invalid value for 'num_ctx'"),
    ("parameters", [1], "invalid value for 'parameters': expected an object"),
    ("from", "./folder", "'./folder' is neither an absolute folder path nor a model's name"),
])
def test_create_refuses_what_it_cannot_honour(http, field, value, message):
    answer = http.post("/api/create", json={"model": "refused", "from": "krasis-tiny",
                                            field: value})
    assert answer.status_code == 400 and message in answer.json()["error"]
    assert http.post("/api/show", json={"model": "refused"}).status_code == 404


# ------------------------------------------------------------------ options, push, blobs

def test_unknown_options_are_logged_and_ignored(ollama_client, http, caplog):
    with caplog.at_level(logging.INFO, logger="krasisd.api"):
        answer = ollama_client.generate(model="krasis-tiny", prompt="hi", options={
            "num_predict": 2, "draft_num_predict": 4, "no_such_option": True})
    assert answer.eval_count == 2
    [record] = [r for r in caplog.records if r.getMessage() == "ignoring unknown options"]
    assert record.levelno == logging.INFO
    assert record.options == ["'draft_num_predict'", "'no_such_option'"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="krasisd.api"):
        answer = http.post("/api/generate", json={
            "model": "krasis-tiny", "prompt": "hi", "stream": False,
            "options": {"num_predict": 1, "x" + "y" * 100_000: 1}})
    assert answer.status_code == 200 and answer.json()["eval_count"] == 1
    [record] = [r for r in caplog.records if r.getMessage() == "ignoring unknown options"]
    assert len(record.options[0]) < 50  # the log shows a client's key cut short
    answer = http.post("/api/generate", json={"model": "krasis-tiny", "prompt": "hi",
                                              "options": {"top_k": "many"}})
    assert answer.status_code == 400 and "'top_k'" in answer.json()["error"]


def test_push_says_it_is_not_supported(http):
    answer = http.post("/api/push", json={"model": "krasis-tiny"})
    assert answer.status_code == 501 and "no registry to push" in answer.json()["error"]


def test_create_from_uploaded_blobs(daemon, ollama_client, http):
    """ollama create's way: upload each file as a blob, then create with files."""
    files = {}
    for path in sorted(daemon.folder.iterdir()):
        files[path.name] = ollama_client.create_blob(path)
        assert http.head(f"/api/blobs/{files[path.name]}").status_code == 200
    done = ollama_client.create(model="uploaded", files=files, system="from blobs",
                                parameters={"num_predict": 2})
    assert done.status == "success"
    assert _system(http, "uploaded") == "from blobs"
    shown = http.post("/api/show", json={"model": "uploaded"}).json()
    assert shown["source"] == "local"
    assert shown["digest"] == http.post("/api/show", json={"model": "krasis-tiny"}).json()[
        "digest"]  # the same files
    assert ollama_client.generate(model="uploaded", prompt="x").eval_count == 2
    for digest in files.values():  # used: the model's files hold the bytes now
        assert http.head(f"/api/blobs/{digest}").status_code == 404


def test_blob_and_files_refusals(daemon, http):
    good = "sha256:" + hashlib.sha256(b"bytes").hexdigest()
    wrong = "sha256:" + "0" * 64
    answer = http.post(f"/api/blobs/{wrong}", content=b"bytes")
    assert answer.status_code == 400 and "digest mismatch" in answer.json()["error"]
    assert http.head(f"/api/blobs/{wrong}").status_code == 404
    answer = http.post("/api/blobs/sha256:xyz", content=b"bytes")
    assert answer.status_code == 400 and "invalid digest" in answer.json()["error"]
    assert http.head("/api/blobs/md5:00").status_code == 400
    assert http.post(f"/api/blobs/{good}", content=b"bytes").status_code == 201
    assert http.head(f"/api/blobs/{good}").status_code == 200
    for files, message in [
            ({"config.json": wrong}, "blob sha256:000"),
            ({"../config.json": good}, "refusing file path"),
            ({"config.json": "12"}, "invalid digest"),
            ({"model.gguf": good}, "the uploaded model has no .safetensors weights"),
            ([good], "expected an object of file names")]:
        answer = http.post("/api/create", json={"model": "blobbed", "files": files,
                                                "stream": False})
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    answer = http.post("/api/create", json={"model": "blobbed", "files": {"a": good},
                                            "path": str(daemon.folder)})
    assert answer.status_code == 400 and "give one of" in answer.json()["error"]
    assert http.post("/api/show", json={"model": "blobbed"}).status_code == 404  # nothing kept


def test_blob_larger_than_the_body_limit(http):
    """A blob is streamed to disk: KRASIS_MAX_BODY (16 MiB) bounds JSON bodies, not blobs."""
    data = bytes(range(256)) * (80 * 1024)  # 20 MiB
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert http.head(f"/api/blobs/{digest}").status_code == 200


# ------------------------------------------------------------------ ps and the CLI

@pytest.mark.parametrize("seconds", [1e308, math.inf, math.nan, 1e12, -5.0, None])
def test_expires_at_never_fails(seconds):
    stamp = _expires_at(seconds)
    assert stamp.endswith("Z")
    if seconds is None or not math.isfinite(seconds) or seconds > 1e10:
        assert stamp.startswith("2318-01-01")


def test_cli_show_parts(daemon, pirate, monkeypatch, capsys):
    from client import cli

    monkeypatch.setenv("KRASIS_SOCKET", str(daemon.socket_path))
    assert cli.main(["show", pirate, "--system"]) == 0
    assert capsys.readouterr().out == "talk like a pirate\n"
    assert cli.main(["show", pirate, "--parameters"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{'num_predict':<30} 3"
    assert cli.main(["show", pirate, "--template"]) == 0
    assert "No template" in capsys.readouterr().out
    assert cli.main(["show", "krasis-tiny", "--system"]) == 0
    assert capsys.readouterr().out == "No system was specified for this model.\n"


def test_with_model_defaults_where_the_system_message_goes():
    from krasisd import api

    def generate(**fields):
        return api.generate_request({"model": "m", "prompt": "p", **fields})

    defaults = ("model system", {"num_predict": 7, "temperature": 0.1})
    req = generate().with_model_defaults(*defaults)
    assert req.system == "model system" and req.options.num_predict == 7
    assert req.options.temperature == 0.1 and req.options.top_k == 40  # Ollama's default
    assert generate(system="").with_model_defaults(*defaults).system == "model system"
    assert generate(system="own").with_model_defaults(*defaults).system == "own"
    assert generate(raw=True).with_model_defaults(*defaults).system is None
    assert generate(suffix="s").with_model_defaults(*defaults).system is None  # as Ollama's FIM
    own = generate(options={"temperature": 0.9}).with_model_defaults(*defaults)
    assert own.options.temperature == 0.9 and own.options.num_predict == 7
    empty = api.chat_request({"model": "m", "messages": []}).with_model_defaults(*defaults)
    assert empty.messages == [] and empty.is_empty  # a load request stays one
    text = api.openai_completion_request({"model": "m", "prompt": "p"}).inference
    assert text.options.num_predict == 16  # OpenAI's default ...
    assert text.with_model_defaults(*defaults).options.num_predict == 7  # ... under the model's
    assert text.with_model_defaults(*defaults).options.top_k == 0  # OpenAI's base kept
    untouched = generate()
    assert untouched.with_model_defaults(None, {}) is untouched
