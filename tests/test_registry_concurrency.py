"""The JSON registries (models.json, adapters.json) under writers in several processes at once:
the CLI and a running web server each read-modify-write them, and no entry may be lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PER_PROCESS = 40

# Each writer waits for a start file so that both hammer the registry at the same time.
MODELS_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from dialogue.gguf import models
    tag, gguf, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.001)
    for i in range(int(sys.argv[4])):
        models.add(f"{tag}-{i}", gguf)
    for i in range(0, int(sys.argv[4]), 4):
        models.remove(f"{tag}-{i}")
""")

ADAPTERS_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dialogue.local import adapters
    tag, go = sys.argv[1], Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    for i in range(int(sys.argv[3])):
        adapters._register(f"{tag}-{i}", dict(
            path=f"/nowhere/{tag}-{i}.gguf", base="smollm2", base_hash="0", architecture="llama",
            rank=8, alpha=16.0, targets=["attn_q"], tensors=2, size=1, source="gguf", origin="-",
            managed=False))
""")


def _hammer(tmp_path: Path, script: str, args_of) -> None:
    env = {**os.environ, "DIALOGUE_HOME": str(tmp_path / "home")}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", script, *args_of(tag, go)], env=env,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b", "c")]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def test_models_registry_loses_no_entry_under_three_writing_processes(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    _hammer(tmp_path, MODELS_WRITER, lambda tag, go: [tag, str(gguf), str(go), str(PER_PROCESS)])
    names = set(json.loads((tmp_path / "home" / "models.json").read_text())["models"])
    want = {f"{t}-{i}" for t in "abc" for i in range(PER_PROCESS) if i % 4}
    assert names == want  # every add kept, every remove applied


def test_adapters_registry_loses_no_entry_under_three_writing_processes(tmp_path):
    _hammer(tmp_path, ADAPTERS_WRITER, lambda tag, go: [tag, str(go), str(PER_PROCESS)])
    doc = json.loads((tmp_path / "home" / "adapters.json").read_text())
    assert set(doc["adapters"]) == {f"{t}-{i}" for t in "abc" for i in range(PER_PROCESS)}


def test_a_registry_held_too_long_is_a_clear_error(tmp_path, monkeypatch):
    from filelock import FileLock

    from dialogue.errors import UnknownModelError
    from dialogue.gguf import models
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path))
    other = FileLock(str(models.registry_path()) + ".lock", thread_local=False)
    # another process's lock: a FileLock object of its own on the same file (flock is per open file)
    with other:
        with pytest.raises(UnknownModelError, match="stayed locked by another dialogue process"):
            with models.registry_lock(models.registry_path(), timeout=0.2):
                pass
    with models.registry_lock(models.registry_path(), timeout=0.2):
        pass  # free again
