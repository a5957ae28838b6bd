"""A dialogue's adapter set: chosen and checked through the service, the CLI and the
Python API, applied to its prompts, and tried side by side before choosing (`trial`, `dialogue
adapters compare`). Real GGUF LoRA files with random factors on the bundled model and the real
llama.cpp runtime; no training here (tests/test_adapters.py trains real adapters)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dialogue.api import Dialogue
from dialogue.cli.main import main as cli_main
from dialogue.llm.base import Done, ProviderError, TextDelta, Usage
from dialogue.gguf.lora import AdapterError, AdapterMismatchError, write_lora
from dialogue.local import adapters as A
from dialogue.local.adapters import UnknownAdapterError
from dialogue.service import DialogueService, RunError
from dialogue.store import ConflictError
from loras import random_factors, strong_lora

Q = "What is the capital of France?"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
async def svc(home):
    s = DialogueService(home / "d.db")
    yield s
    await s.aclose()


@pytest.fixture
def loras(home) -> dict[str, str]:
    """Two strong adapters registered as 'sharp' and 'soft', and one for another architecture."""
    out = {n: A.add(strong_lora(home / f"{n}.gguf", seed), n).path for n, seed in (("sharp", 1), ("soft", 2))}
    out["qwen"] = str(write_lora(home / "q.gguf", "qwen2", random_factors(3, 2, layers=[0])))
    return out


async def answer(svc: DialogueService, name: str, adapters, n: int = 12) -> str:
    parts = []
    async for ev in svc.trial(name, Q, adapters=adapters, max_tokens=n):
        if isinstance(ev, TextDelta):
            parts.append(ev.text)
    return "".join(parts)


async def test_set_adapters_is_checked_versioned_and_clearable(svc, loras):
    d = svc.create("d", model="local:default")
    got = svc.set_adapters("d", {"sharp": 1, "soft": 0})
    assert got.meta["adapters"] == {"sharp": 1.0, "soft": 0.0}  # 0 = listed but off, kept
    assert got.version == d.version + 1 and svc.adapters("d") == {"sharp": 1.0, "soft": 0.0}
    assert [v.op for v in svc.store.history(d.id)][-1] == "adapters"
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'nope' \(registered: sharp, soft\)"):
        svc.set_adapters("d", {"nope": 1})
    with pytest.raises(AdapterMismatchError, match="qwen2"):
        svc.set_adapters("d", {loras["qwen"]: 1})
    for bad in ({"sharp": "x"}, {"sharp": float("inf")}, ["sharp"], {"": 1}):
        with pytest.raises(AdapterError):
            svc.set_adapters("d", bad)
    with pytest.raises(ConflictError):
        svc.set_adapters("d", {"soft": 1}, base_version=d.version)  # a stale tab
    assert svc.adapters("d") == {"sharp": 1.0, "soft": 0.0}  # nothing of the refused changes
    svc.update("d", model="gpt-5")
    with pytest.raises(ProviderError, match="local models only"):
        svc.set_adapters("d", {"soft": 1})
    assert svc.adapters("d") == {"sharp": 1.0, "soft": 0.0}  # the set stays, shown as inactive
    assert svc.adapter_choices("d") == []
    svc.update("d", model="local:default")
    assert "adapters" not in svc.set_adapters("d", None).meta
    assert svc.adapters("d") == {}


async def test_choices_are_the_adapters_that_fit(svc, loras, home):
    svc.create("d", model="local:default")
    assert sorted(i.name for i in svc.adapter_choices("d")) == ["sharp", "soft"]
    # registered for the same base through another file name: still fits by its shapes
    A.add(write_lora(home / "other.gguf", "llama", random_factors(4, 2)), "other")
    assert sorted(i.name for i in svc.adapter_choices("d")) == ["other", "sharp", "soft"]


async def test_trial_compares_sets_and_stores_nothing(svc, loras):
    svc.create("d", model="local:default")
    svc.add("d", "note", "We talk about geography.")
    before = svc.open("d")
    base, sharp, soft = [await answer(svc, "d", s) for s in ({}, {"sharp": 1.0}, {"soft": 1.0})]
    assert len({base, sharp, soft}) == 3, (base, sharp, soft)  # each set answers differently
    assert "Paris" in base
    assert await answer(svc, "d", {"sharp": 1.0}) == sharp  # switching back: the same answer
    assert await answer(svc, "d", {"sharp": 1.0, "soft": 0.0}) == sharp  # scale 0 = off
    after = svc.open("d")
    assert after.version == before.version and [m.id for m in after.messages] == [m.id for m in before.messages]
    # the trial's answer is what a stored prompt gets under that set
    svc.set_adapters("d", {"sharp": 1.0})
    svc.update("d", meta={**svc.open("d").meta, "max_tokens": 12})
    m = svc.add("d", "prompt", Q)
    final = await svc.run("d", m.id)
    assert final.response == sharp and not final.meta.get("error")


async def test_trial_refuses_bad_input_before_streaming(svc, loras):
    svc.create("d", model="local:default")
    with pytest.raises(UnknownAdapterError):
        await answer(svc, "d", {"nope": 1.0})
    with pytest.raises(RunError, match="empty"):
        async for _ in svc.trial("d", "  ", adapters={}):
            pass
    svc.update("d", model="gpt-5")
    with pytest.raises(ProviderError, match="local models only"):
        await answer(svc, "d", {"sharp": 1.0})


async def test_trial_ends_with_usage_and_done(svc, loras):
    svc.create("d", model="local:default")
    evs = [ev async for ev in svc.trial("d", Q, adapters={"soft": 0.5}, max_tokens=5)]
    assert isinstance(evs[-1], Done) and evs[-1].stop_reason == "max_tokens"
    assert sum(e.output for e in evs if isinstance(e, Usage)) == 5


def test_cli_use_show_and_compare(home, loras, capsys):
    db = str(home / "cli.db")
    run = lambda *a: cli_main(["--db", db, *a])  # noqa: E731
    assert run("new", "geo", "--model", "local:default") == 0
    assert run("adapters", "use", "geo", "sharp=0.5", "soft") == 0
    assert "adapters sharp ×0.5, soft ×1" in capsys.readouterr().out
    assert run("show", "geo") == 0
    assert "adapters: sharp ×0.5, soft ×1" in capsys.readouterr().out
    assert run("adapters", "use", "geo", "nope") == 1
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert run("adapters", "use", "geo", "sharp=lots") == 1
    assert "bad adapter 'sharp=lots'" in capsys.readouterr().err
    assert run("adapters", "use", "geo") == 0  # no names: shows the set, changes nothing
    assert "sharp ×0.5, soft ×1" in capsys.readouterr().out
    assert run("adapters", "compare", "geo", Q, "--set", "none", "--set", "sharp=1,soft=0",
               "--max-tokens", "8", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["set"] for r in res] == [{}, {"sharp": 1.0, "soft": 0.0}]
    assert res[0]["answer"] != res[1]["answer"] and all(r["output_tokens"] == 8 for r in res)
    # a trial ends with the usage record an answer is stored with: counts, model, stop, cost
    for r in res:
        u = r["usage"]
        assert u["model"] == "local:default" and u["output"] == 8 and u["input"] > 0
        assert u["stop_reason"] == "max_tokens" and u["cost"] == 0.0
    assert run("adapters", "compare", "geo", "  ", "--set", "none") == 1
    assert "empty" in capsys.readouterr().err  # a refusal is one line, as before
    assert run("adapters", "use", "geo", "--clear") == 0
    assert "none (the bare base)" in capsys.readouterr().out


async def test_python_api(home, loras):
    d = Dialogue.create("api", db=home / "api.db", model="local:default")
    d.adapters = {"soft": 2.0}
    assert d.adapters == {"soft": 2.0}
    with pytest.raises(UnknownAdapterError):
        d.adapters = {"missing": 1.0}
    assert d.adapters == {"soft": 2.0}
    a, b = await d.trial(Q, max_tokens=6), await d.trial(Q, {"soft": 2.0}, max_tokens=6)
    assert a and b and a != b and len(d) == 0
    d.adapters = None
    assert d.adapters == {}


async def test_a_file_replaced_in_place_is_served_fresh(svc, home):
    """The runtime keys loaded adapters by content, not path: overwrite a user's file and the next
    answer uses the new weights (and the old handle is freed once detached)."""
    svc.create("d", model="local:default")
    path, other = home / "mine.gguf", home / "other.gguf"
    strong_lora(path, 7)
    strong_lora(other, 8)
    first, second = await answer(svc, "d", {str(path): 1.0}), await answer(svc, "d", {str(other): 1.0})
    assert first != second
    from dialogue.llm.base import get_provider
    from dialogue.gguf.models import model_hash
    old = model_hash(path)
    tmp = strong_lora(home / "new.gguf", 8)
    tmp.replace(path)  # same path, the other adapter's content
    assert await answer(svc, "d", {str(path): 1.0}) == second
    loaded = get_provider("local:default").runtime.status()["loaded_adapters"]
    # the replaced content's handle was freed; the new content shares the other file's handle
    assert old not in loaded and model_hash(path) == model_hash(other) in loaded
