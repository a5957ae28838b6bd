"""What produced an answer (`meta["provenance"]`) and `replay`: the bundled model and real GGUF
LoRA files through the service and the CLI."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from dialogue.cli.main import main as cli_main
from dialogue.gguf.models import model_hash, resolve
from dialogue.local import adapters as A
from dialogue.provenance import compare
from dialogue.service import DialogueService, NotFoundError
from loras import strong_lora


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    return tmp_path


@pytest.fixture
async def svc(home):
    s = DialogueService(home / "d.db")
    yield s
    await s.aclose()


def test_compare_names_what_changed_and_diffs_the_text():
    then = {"model": "local:x", "model_hash": "a" * 64,
            "adapters": {"files": [{"path": "/a/s.gguf", "hash": "1" * 64, "scale": 1.0}]},
            "sampling": {"max_tokens": 50, "temperature": None, "seed": None, "sampling": None},
            "tools_called": ["search"]}
    now = {"model": "local:x", "model_hash": "b" * 64,
           "adapters": {"files": [{"path": "/a/s.gguf", "hash": "2" * 64, "scale": 1.0}]},
           "sampling": {"max_tokens": 50, "temperature": None, "seed": None, "sampling": None}}
    v = compare("one\ntwo\n", "one\nthree\n", then, now)
    assert not v["same"]
    assert [c["what"] for c in v["changes"]] == ["model_hash", "adapter s.gguf"]
    assert v["diff"].splitlines()[-2:] == ["-two", "+three"]
    assert any("called tools (search)" in n for n in v["notes"])
    same = compare("x", "x", now, now)
    assert same["same"] and same["diff"] == "" and same["changes"] == []
    # an answer from before provenance: compared as text, with a note saying so
    old = compare("x", "y", None, now)
    assert not old["same"] and "before provenance" in old["notes"][0]
    # sampled without a seed: a different answer is expected, and the note says so
    hot = {**now, "sampling": {**now["sampling"], "temperature": 0.9}}
    assert any("without a seed" in n for n in compare("x", "y", hot, hot)["notes"])


async def test_an_answer_records_what_produced_it_and_replays_the_same(svc):
    svc.create("chat", model="local:default", system="Answer briefly.")
    svc.update("chat", meta={"max_tokens": 24})
    p = svc.add("chat", "prompt", "What is the capital of France?")
    m = await svc.run("chat", p.id)
    prov = m.meta["provenance"]
    spec = resolve("local:default")
    assert prov["model"] == "local:default" and prov["model_file"] == os.path.basename(spec.path)
    assert prov["model_hash"] == model_hash(spec.path)
    assert prov["sampling"] == {"max_tokens": 24, "temperature": None, "seed": None, "sampling": None}
    assert prov["tools_offered"] == [] and prov["tools_called"] == []
    assert prov["cache_read"] == m.usage["cache_read"]
    # greedy decoding replays to the same text, and nothing is stored
    before = svc.history("chat", p.id)
    v = await svc.replay("chat", p.id)
    assert v["same"], v["diff"]
    assert v["replayed"] == m.response and v["changes"] == [] and v["error"] in ("", None)
    assert svc.history("chat", p.id) == before
    # a sampled answer gets a seed of its own, recorded, so it replays exactly too
    svc.update("chat", meta={"max_tokens": 24, "temperature": 1.2})
    q = svc.add("chat", "prompt", "Name a colour.")
    m2 = await svc.run("chat", q.id)
    seed = m2.meta["provenance"]["sampling"]["seed"]
    assert isinstance(seed, int) and m2.meta["provenance"]["sampling"]["temperature"] == 1.2
    svc.update("chat", meta={"max_tokens": 24})  # today's settings do not matter: the record's do
    v2 = await svc.replay("chat", q.id)
    assert v2["same"], v2["diff"]
    assert v2["provenance"]["sampling"]["seed"] == seed
    # only an answered prompt can be replayed
    c = svc.add("chat", "code", "1")
    with pytest.raises(NotFoundError, match="not an answered prompt"):
        await svc.replay("chat", c.id)


async def test_a_replaced_adapter_is_named_and_the_answer_differs(svc, home, capsys):
    path = A.add(strong_lora(home / "sharp.gguf", 1), "sharp").path
    svc.create("d", model="local:default")
    svc.update("d", meta={"max_tokens": 16})
    svc.set_adapters("d", {"sharp": 1.0})
    p = svc.add("d", "prompt", "What is the capital of France?")
    m = await svc.run("d", p.id)
    files = m.meta["provenance"]["adapters"]["files"]
    assert m.meta["provenance"]["adapters"]["set"] == {"sharp": 1.0}
    assert files == [{"file": os.path.basename(path), "path": path, "hash": model_hash(path),
                      "scale": 1.0}]
    cli = lambda *args: asyncio.to_thread(cli_main, ["--db", str(home / "d.db"), *args])  # noqa: E731
    assert await cli("replay", "d", p.id) == 0
    assert "the same as the stored one" in capsys.readouterr().out
    strong_lora(Path(path), 7)  # the registered file is replaced in place by another adapter
    v = await svc.replay("d", p.id)
    assert [c["what"] for c in v["changes"]] == [f"adapter {os.path.basename(path)}"]
    assert v["changes"][0]["now"][0] == model_hash(path)
    assert not v["same"] and v["diff"].startswith("--- stored\n+++ replayed")
    rc = await cli("replay", "d", p.id, "--json")
    got = json.loads(capsys.readouterr().out)
    assert rc == 1 and got["same"] is False and got["changes"][0]["what"].startswith("adapter ")
