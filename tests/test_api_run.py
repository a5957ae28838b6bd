"""The Python API runs cells and asks the model: `run`, `run_all`, `ask` (whole or streamed), in a
script and under a running event loop (as in Jupyter), with a real kernel and the bundled model."""
import asyncio

import pytest

from dialogue import Dialogue, api


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k in ("DIALOGUE_MODEL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    yield
    api.shutdown()


def test_run_and_run_all_in_a_script(tmp_path):
    d = Dialogue.create("calc", db=tmp_path / "a.db")
    assert repr(d) == "Dialogue('calc', 0 messages)"
    m = d.add_code("x = 6 * 7\nx")
    assert repr(d) == "Dialogue('calc', 1 message)"
    done = d.run(m)
    assert done.outputs[-1]["data"]["text/plain"] == "42"
    assert d.messages[0].outputs == done.outputs  # stored
    d.add_note("a note between")
    d.add_code("print(x + 1)")
    assert d.run("-1").outputs[0]["text"] == "43\n"  # by position; the kernel kept x
    d.add_code("1/0")
    d.add_code("print('after')")
    ran = d.run_all()
    assert [r.source for r in ran] == ["x = 6 * 7\nx", "print(x + 1)", "1/0"]
    assert d[-1].outputs == []  # stopped at the error
    assert any(o.get("ename") == "ZeroDivisionError" for o in d[3].outputs)
    ran = d.run_all(stop_on_error=False)
    assert len(ran) == 4 and d[-1].outputs[0]["text"] == "after\n"


def test_run_under_a_running_loop_as_in_jupyter(tmp_path):
    d = Dialogue.create("nb", db=tmp_path / "b.db")
    m = d.add_code("import os; os.getpid()")

    async def cell():  # Jupyter runs a cell's code while its own loop is running
        return d.run(m)
    done = asyncio.run(cell())
    assert done.outputs[-1]["data"]["text/plain"].isdigit()


def test_ask_whole_and_streamed_with_the_bundled_model(tmp_path):
    d = Dialogue.create("qa", db=tmp_path / "c.db")
    answer = d.ask("What is the capital of France? One word.")
    assert "Paris" in answer.response and answer.usage["output"] > 0
    assert d[-1].id == answer.id and d[-1].response == answer.response
    stream = d.ask("Name the largest planet in the solar system.", stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "Jupiter" in "".join(pieces)
    assert stream.message.response == "".join(pieces) == d[-1].response
    # leaving the loop early ends the answer there and keeps what was written
    stream = d.ask("Count from one to fifty in words, comma separated.", stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    kept = d[-1]
    assert kept.id == stream.message.id and kept.response and len(kept.response) < 200
    assert len(d) == 3
