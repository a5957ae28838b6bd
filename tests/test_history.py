"""History read as steps (one edit and its run is one step, with a diff), and restoring a version
brings back the outputs of that source, never those of other code. A real kernel runs the code."""
import asyncio

import pytest

from dialogue.history import belonging_state, source_diff, steps
from dialogue.service import DialogueService, NotFoundError


@pytest.fixture
def svc(tmp_path):
    s = DialogueService(tmp_path / "h.db")
    yield s
    asyncio.run(s.aclose())


def test_an_edit_and_its_run_read_as_one_step_with_a_diff(svc):
    async def go():
        d = svc.create("calc")
        m = svc.add(d.id, "code", "total = sum(range(10))\ntotal")
        await svc.run(d.id, m.id)
        svc.edit(d.id, m.id, base_version=None, source="total = sum(range(10))\n  total")
        await svc.run(d.id, m.id)
        svc.set_flags(d.id, m.id, pinned=True)
        svc.edit(d.id, m.id, base_version=None, source="y = 2")
        return d, m
    d, m = asyncio.run(go())
    raw = svc.history(d.id, m.id)
    # a first run clears nothing, so it writes only its result
    assert [v.op for v in raw] == ["create", "result", "edit", "run", "result", "flags", "edit"]
    st = svc.history_steps(d.id, m.id)
    assert [s.versions_text() for s in st] == ["v1–v2", "v3–v6", "v7"]
    assert [s.summary() for s in st] == ["created · ran: ok", "edited · ran: error · flags",
                                         "edited"]
    assert st[0].diff == "" and st[0].state["outputs"][0]["data"]["text/plain"] == "45"
    assert st[1].diff.splitlines() == [
        "--- step 1 (v1–v2)", "+++ step 2 (v3–v6)", "@@ -1,2 +1,2 @@",
        " total = sum(range(10))", "-total", "+  total"]
    assert "-total = sum(range(10))" in st[2].diff and "+y = 2" in st[2].diff
    assert st[1].status == "error" and not st[2].ran


def test_restore_brings_back_the_outputs_of_that_source(svc):
    async def go():
        d = svc.create("restore")
        m = svc.add(d.id, "code", "total = sum(range(10))\ntotal")
        await svc.run(d.id, m.id)                                        # v2: 45
        svc.edit(d.id, m.id, base_version=None, source="bad = 1\n  worse = 2")  # v3
        await svc.run(d.id, m.id)                                        # v4, v5: an error
        svc.edit(d.id, m.id, base_version=None, source="never_ran = 3")  # v6, error still shown
        return d, m
    d, m = asyncio.run(go())
    cur = svc.message(d.id, m.id)
    assert cur.outputs[0]["ename"] == "IndentationError"  # an edit keeps the old outputs
    # restoring the first source brings back its own result, not the IndentationError
    back = svc.restore_version(d.id, m.id, 1)
    assert back.source == "total = sum(range(10))\ntotal"
    assert back.outputs[0]["data"]["text/plain"] == "45"
    assert back.meta["run"]["status"] == "ok"
    # a version whose source never ran comes back with no outputs (they were of other code)
    again = svc.restore_version(d.id, m.id, 6)
    assert again.source == "never_ran = 3" and again.outputs == [] and "run" not in again.meta
    assert again.execution_count is None
    # the error version comes back with its error
    err = svc.restore_version(d.id, m.id, 3)
    assert err.outputs[0]["ename"] == "IndentationError" and err.meta["run"]["status"] == "error"
    ops = [v.op for v in svc.history(d.id, m.id)][-3:]
    assert ops == ["restore:1", "restore:6", "restore:3"]
    with pytest.raises(NotFoundError, match="no version 99"):
        svc.restore_version(d.id, m.id, 99)


def test_a_prompts_answer_belongs_to_its_source(svc):
    d = svc.create("p")
    m = svc.add(d.id, "prompt", "first question")
    svc.store.begin_stream(m.id)
    svc.store.finish_stream(m.id, response="first answer", meta={"run": {"status": "ok"}})
    svc.edit(d.id, m.id, base_version=None, source="second question")
    svc.store.begin_stream(m.id)
    svc.store.finish_stream(m.id, response="second answer", meta={"run": {"status": "ok"}})
    back = svc.restore_version(d.id, m.id, 1)
    assert (back.source, back.response) == ("first question", "first answer")
    state = belonging_state(svc.history(d.id, m.id), 4)  # the edit: the answer after it
    assert state["response"] == "second answer"
    assert len(steps(svc.history(d.id, m.id))) == 3


def test_source_diff():
    assert source_diff("a", "a") == ""
    assert source_diff("a\nb", "a\nc").splitlines()[2:] == ["@@ -1,2 +1,2 @@", " a", "-b", "+c"]


def test_cli_history_prints_steps_with_a_diff(tmp_path):
    from test_cli import ok
    db = tmp_path / "c.db"
    ok(db, "new", "s")
    ok(db, "add", "s", "--code", "total = sum(range(10))\ntotal", "--run")
    ok(db, "edit", "s", "1", "--source", "total = sum(range(10))\n  total")
    shown = ok(db, "history", "s", "1")
    lines = [ln.rstrip() for ln in shown.splitlines()]
    assert any(ln.startswith("step 1  v1–v2") and ln.endswith("created · ran: ok") for ln in lines)
    assert any(ln.startswith("step 2  v3") and ln.endswith("edited") for ln in lines)
    assert "  -total" in lines and "  +  total" in lines and "  → 45" in lines
    raw = ok(db, "history", "s", "1", "--versions")
    assert "create" in raw and "result" in raw and "edit" in raw
