"""Adapters in the web app: the picker next to the model (choose a set, versioned, with
refusals as toasts), the side-by-side trial of two sets (streamed, escaped, kept as a cell), and
Run all.

Real parts: small random GGUF LoRA files written with `gguf.lora.write_lora` for the bundled
SmolLM2 base and registered in a registry of this test's own (`DIALOGUE_HOME`); the bundled model
answers (greedy, so the same prompt under the same set gives the same text); a real ipykernel runs
the cells; a real uvicorn serves the test that cuts a stream.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from dialogue.gguf.lora import write_lora
from dialogue.local import adapters as A
from dialogue.web import views as V

from loras import random_factors
from webutil import HX, Tags, line_events, live_server, sse_events

@pytest.fixture
def loras(env: Path) -> dict[str, Path]:
    """Two adapters registered for the bundled base (`env` points DIALOGUE_HOME at this test's
    folder, so the registry is this test's alone), and files that do not fit it."""
    d = env / "loras"
    files = {"weak": write_lora(d / "weak.gguf", "llama", random_factors(1, 4, std=0.05)),
             "strong": write_lora(d / "strong.gguf", "llama", random_factors(2, 8, std=0.3),
                                    meta={"dialogue.trained_on": "docs", "dialogue.dialogues": "pirates"})}
    for name, f in files.items():
        A.add(f, name)
    small = {"attn_q": (64, 64), "attn_v": (64, 64)}
    files["mismatch"] = write_lora(d / "other-shapes.gguf", "llama", random_factors(3, 4, std=0.05, shapes=small))
    return files


def _local(db, name: str, **kw):
    return db.create(name, model="local:default", meta={"max_tokens": 16}, **kw)


def _badges(html: str) -> dict[str, str]:
    """adapter name -> class of its badge, in a fragment."""
    return {a["data-adapter"]: a["class"] for a in Tags(html).find("span")
            if "adapter-badge" in (a.get("class") or "").split()}


def _trial(client, did: str, source: str, a: dict, b: dict, max_tokens: int = 16) -> dict:
    """Start a trial through the form and read its whole stream: {"a": text, "b": text, "events",
    "end-a", "end-b"}."""
    data: dict = {"source": source, "max_tokens": str(max_tokens), "a-on": list(a), "b-on": list(b)}
    data.update({f"a-scale:{k}": str(v) for k, v in a.items()})
    data.update({f"b-scale:{k}": str(v) for k, v in b.items()})
    r = client.post(f"/d/{did}/trials", data=data, headers=HX)
    assert r.status_code == 200, r.text
    out = Tags(r.text).find("div", id="trial-out")[0]
    tid = out["data-trial"]
    assert out["sse-connect"] == f"/d/{did}/trials/{tid}/stream" and out["sse-close"] == "close"
    s = client.get(out["sse-connect"])
    assert s.headers["content-type"].startswith("text/event-stream")
    events = sse_events(s.text)
    texts = {side: "".join("".join(Tags(data).text) for e, data in events if e == f"text-{side}")
             for side in "ab"}
    return {"tid": tid, "events": events, **texts, **{e: d for e, d in events if e.startswith("end-")}}


# ---------------------------------------------------------------- the picker

def test_picker_lists_fitting_adapters_and_saving_stores_a_versioned_set(client, db, loras):
    d = _local(db, "Picker")
    page = client.get(f"/d/{d.id}").text
    t = Tags(page)
    assert t.find("div", id="adapters") and "no adapters" in page
    rows = {a["data-adapter"] for a in t.find("div") if "adapter-row" in (a.get("class") or "").split()}
    assert rows == {"weak", "strong"}  # the mismatched file is not registered, so not offered
    assert "rank 8" in page and "trained on docs (pirates)" in page and "rank 4" in page
    assert t.find("button", data_act="compare") and t.find("button", data_act="run-all")

    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/adapters", headers=HX, data={
        "dversion": v, "set-on": ["strong", "weak"], "set-scale:strong": "0.5", "set-scale:weak": "0"})
    assert r.status_code == 200 and r.headers["hx-reswap"] == "none"
    stored = db.open(d.id)
    assert stored.meta["adapters"] == {"strong": 0.5, "weak": 0.0} and stored.version == v + 1
    assert stored.meta["max_tokens"] == 16  # the rest of meta is kept
    # the page's picker and version move on, out of band; 0 is "listed but off"
    assert Tags(r.text).find("input", id="dversion")[0]["value"] == str(v + 1)
    ctl = Tags(r.text).find("div", id="adapters")[0]
    assert ctl["hx-swap-oob"] == "true"
    badges = _badges(r.text)
    assert set(badges) == {"strong", "weak"} and "off" in badges["weak"] and "off" not in badges["strong"]
    assert "strong ×0.5" in r.text and "Adapters: strong ×0.5, weak ×0" in r.text
    # the badges are on the page without opening anything, and on the dialogue list
    page = client.get(f"/d/{d.id}").text
    summary = Tags(page).find("summary", data_act="adapters-menu")
    assert summary and set(_badges(page)) == {"strong", "weak"}
    assert set(_badges(client.get("/").text)) == {"strong", "weak"}
    # the editor shows the stored set: checked, with its scales
    checked = {a["value"] for a in Tags(page).find("input", type="checkbox", name="set-on")
               if "checked" in a}
    assert checked == {"strong", "weak"}
    assert Tags(page).find("input", name="set-scale:strong")[0]["value"] == "0.5"

    r = client.post(f"/d/{d.id}/adapters", data={"dversion": v + 1, "clear": "1"}, headers=HX)
    assert r.status_code == 200 and "adapters" not in db.open(d.id).meta
    assert db.open(d.id).version == v + 2 and "the base model answers" in r.text


def test_unknown_mismatched_and_bad_input_are_refused_with_a_toast(client, db, loras):
    d = _local(db, "Refusals")
    v = db.open(d.id).version

    def post(data):
        r = client.post(f"/d/{d.id}/adapters", data={"dversion": v, **data}, headers=HX)
        assert r.headers.get("hx-reswap") == "none"
        assert Tags(r.text).find("div", id="toast")[0]["class"] == "toast error"
        after = db.open(d.id)
        assert "adapters" not in after.meta and after.version == v, "a refusal changed something"
        return r

    r = post({"set-on": ["nope"]})
    assert r.status_code == 400 and "unknown adapter 'nope'" in r.text and "strong" in r.text
    r = post({"set-on": [str(loras["mismatch"])]})
    assert r.status_code == 400 and "does not fit" in r.text
    r = post({"set-on": ["weak"], "set-scale:weak": "lots"})
    assert r.status_code == 400 and "must be a number" in r.text
    r = post({"set-on": ["weak"], "set-scale:weak": "inf"})
    assert r.status_code == 400 and "finite" in r.text


def test_a_stale_tab_gets_a_conflict_and_changes_nothing(client, db, loras):
    d = _local(db, "Two tabs")
    v = db.open(d.id).version
    first = client.post(f"/d/{d.id}/adapters", data={"dversion": v, "set-on": ["weak"]}, headers=HX)
    assert first.status_code == 200
    stale = client.post(f"/d/{d.id}/adapters", data={"dversion": v, "set-on": ["strong"]},
                        headers=HX)
    assert stale.status_code == 409 and stale.headers["hx-reswap"] == "none"
    assert "conflict" in stale.text and Tags(stale.text).find("a", href=f"/d/{d.id}")  # Reload
    assert db.open(d.id).meta["adapters"] == {"weak": 1.0} and db.open(d.id).version == v + 1


def test_a_non_local_model_keeps_the_set_greyed_and_prompts_are_refused(client, db, loras,
                                                                          monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")  # the picker checks the model is usable
    d = _local(db, "Switch")
    v = db.open(d.id).version
    assert client.post(f"/d/{d.id}/adapters", data={"dversion": v, "set-on": ["weak"]},
                       headers=HX).status_code == 200
    r = client.post(f"/d/{d.id}/settings", data={"model": "claude-haiku-4-5", "dversion": v + 1},
                    headers=HX)
    assert r.status_code == 200
    ctl = Tags(r.text).find("div", id="adapters")[0]
    assert "inactive" in ctl["class"] and "local models only" in r.text
    assert db.open(d.id).meta["adapters"] == {"weak": 1.0}  # kept, not silently dropped
    page = client.get(f"/d/{d.id}").text
    assert not Tags(page).find("button", data_act="compare")
    assert "inactive" in Tags(page).find("span", **{"class": "adapter-badges inactive"})[0]["class"]
    assert client.get(f"/d/{d.id}/compare", headers=HX).status_code == 400
    # a prompt says why it cannot run (the service refuses before calling Anthropic)
    m = db.add(d.id, "prompt", "Hello?")
    assert client.post(f"/d/{d.id}/m/{m.id}/run", headers=HX).status_code == 200
    client.get(f"/d/{d.id}/m/{m.id}/stream")
    assert "local models only" in db.message(d.id, m.id).meta["error"]
    # choosing adapters for it is refused; clearing them works
    r = client.post(f"/d/{d.id}/adapters", data={"dversion": v + 2, "set-on": ["weak"]}, headers=HX)
    assert r.status_code == 400 and "local models only" in r.text
    r = client.post(f"/d/{d.id}/adapters", data={"dversion": v + 2, "clear": "1"}, headers=HX)
    assert r.status_code == 200 and "adapters" not in db.open(d.id).meta
    assert not Tags(r.text).find("span", data_adapter="weak")


def test_an_entry_that_is_no_longer_registered_shows_broken_and_can_be_removed(client, db, loras):
    d = _local(db, "Broken")
    v = db.open(d.id).version
    client.post(f"/d/{d.id}/adapters", data={"dversion": v, "set-on": ["weak", "strong"]}, headers=HX)
    A.remove("weak")
    page = client.get(f"/d/{d.id}").text
    assert "broken" in _badges(page)["weak"] and "broken" not in _badges(page)["strong"]
    row = [a for a in Tags(page).find("div") if a.get("data-adapter") == "weak"][0]
    assert "broken" in row["class"] and "not registered" in page
    # saving with it still checked is refused; unchecking it removes it
    r = client.post(f"/d/{d.id}/adapters", data={"dversion": v + 1, "set-on": ["weak", "strong"]},
                    headers=HX)
    assert r.status_code == 400 and db.open(d.id).meta["adapters"] == {"weak": 1.0, "strong": 1.0}
    r = client.post(f"/d/{d.id}/adapters", data={"dversion": v + 1, "set-on": ["strong"]}, headers=HX)
    assert r.status_code == 200 and db.open(d.id).meta["adapters"] == {"strong": 1.0}


# ---------------------------------------------------------------- the trial

def test_trial_streams_two_answers_keep_adds_one_cell_and_the_chosen_set_applies(client, db, loras):
    q = "What is the capital of France?"
    d = _local(db, "Trial")
    modal = client.get(f"/d/{d.id}/compare", headers=HX)
    assert modal.status_code == 200 and Tags(modal.text).find("dialog", id="compare")
    assert Tags(modal.text).find("input", name="a-on", value="strong")

    tr = _trial(client, d.id, q, {"weak": 1.0}, {})
    names = [e for e, _ in tr["events"]]
    assert names[-1] == "close" and names.index("end-a") < names.index("status-b") < names.index("end-b")
    assert names.count("text-a") >= 2 and names.count("text-b") >= 2  # streamed, piece by piece
    assert tr["a"] and tr["b"] and tr["a"] != tr["b"]  # the adapter changes the greedy answer
    assert "out" in tr["end-a"] and " s" in tr["end-a"] and "Keep this answer" in tr["end-a"]
    assert db.open(d.id).messages == []  # a trial stores nothing

    # the bare base (B) answers what a plain prompt answers in a dialogue without adapters
    plain = _local(db, "Plain")
    m = db.add(plain.id, "prompt", q)
    client.post(f"/d/{plain.id}/m/{m.id}/run", headers=HX)
    client.get(f"/d/{plain.id}/m/{m.id}/stream")
    assert db.message(plain.id, m.id).response == tr["b"]

    # "Use this set" stores A's set (versioned); the next prompt is answered under it
    v = db.open(d.id).version
    r = client.post(f"/d/{d.id}/trials/{tr['tid']}/use", data={"side": "a", "dversion": v}, headers=HX)
    assert r.status_code == 200 and db.open(d.id).meta["adapters"] == {"weak": 1.0}
    p = db.add(d.id, "prompt", q)
    client.post(f"/d/{d.id}/m/{p.id}/run", headers=HX)
    done = dict(sse_events(client.get(f"/d/{d.id}/m/{p.id}/stream").text))["done"]
    assert db.message(d.id, p.id).response == tr["a"] and "run-error" not in done

    # "Keep this answer" adds exactly one prompt cell at the end, with B's answer and its set
    n = len(db.open(d.id).messages)
    r = client.post(f"/d/{d.id}/trials/{tr['tid']}/keep", data={"side": "b"}, headers=HX)
    assert r.status_code == 200
    assert (r.headers["hx-retarget"], r.headers["hx-reswap"]) == ("#cells", "beforeend")
    msgs = db.open(d.id).messages
    assert len(msgs) == n + 1
    kept = msgs[-1]
    assert kept.kind.value == "prompt" and kept.source == q and kept.response == tr["b"]
    assert kept.meta == {"adapters": {}, "trial": True} and kept.usage["output"] > 0
    assert f'id="m-{kept.id}"' in r.text and "kept at the end" in r.text
    again = client.post(f"/d/{d.id}/trials/{tr['tid']}/keep", data={"side": "b"}, headers=HX)
    assert again.status_code == 409 and len(db.open(d.id).messages) == n + 1


def test_model_output_in_a_trial_is_escaped_never_markup(client, db, loras):
    """SmolLM2 answers this with a <script> tag (in a code block): in the streamed pieces, the
    final column and the kept cell it is text, never an element."""
    d = _local(db, "Script")
    tr = _trial(client, d.id, "Write a script tag in HTML that shows an alert.", {}, {"weak": 1.0},
                max_tokens=40)
    assert "<script" in tr["a"]  # the model did write one
    # what the page reads as text holds the tag; what it parses as elements never does
    assert "<script" in "".join(Tags(tr["end-a"]).text)
    for e, data in tr["events"]:
        assert not [t for t, _ in Tags(data).tags if t == "script"], (e, data)
    r = client.post(f"/d/{d.id}/trials/{tr['tid']}/keep", data={"side": "a"}, headers=HX)
    assert r.status_code == 200 and not [t for t, _ in Tags(r.text).tags if t == "script"]
    page = client.get(f"/d/{d.id}").text
    assert "<script" in "".join(Tags(page).text)  # shown as text in the kept cell
    assert all(a.get("src", "").startswith("/static/") for t, a in Tags(page).tags if t == "script")


def test_trials_refuse_bad_input_before_streaming(client, db, loras):
    d = _local(db, "Bad trials")
    r = client.post(f"/d/{d.id}/trials", data={"source": "  ", "a-on": ["weak"]}, headers=HX)
    assert r.status_code == 400 and "Write a prompt" in r.text
    r = client.post(f"/d/{d.id}/trials", data={"source": "Hi", "b-on": ["nope"]}, headers=HX)
    assert r.status_code == 400 and "Set B: nope" in r.text and r.headers["hx-reswap"] == "none"
    r = client.post(f"/d/{d.id}/trials", data={"source": "Hi", "a-on": [str(loras["mismatch"])]},
                    headers=HX)
    assert r.status_code == 400 and "Set A" in r.text
    r = client.post(f"/d/{d.id}/trials", data={"source": "Hi", "max_tokens": "0"}, headers=HX)
    assert r.status_code == 400
    gone = client.post(f"/d/{d.id}/trials/ffff/keep", data={"side": "a"}, headers=HX)
    assert gone.status_code == 404 and "run it again" in gone.text
    # a stream for a trial the server does not know ends at once, without looping
    events = sse_events(client.get(f"/d/{d.id}/trials/ffff/stream").text)
    assert [e for e, _ in events] == ["end-a", "close"]


def test_trial_column_escapes_what_the_model_wrote():
    """The two renderings of an answer: streamed pieces and the final column."""
    evil = "**bold** text\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(2)>"
    assert "<script" not in V.text_chunk(evil) and "&lt;script&gt;" in V.text_chunk(evil)
    col = V.frag(V.trial_column("d", "t", "a", {}, result={
        "text": evil, "usage": {"output": 3}, "seconds": 0.5, "done": True}))
    t = Tags(col)
    assert not [x for x, _ in t.tags if x == "script"] and "<strong>bold</strong>" in col
    assert all("onerror" not in a for x, a in t.tags)


# ---------------------------------------------------------------- a cut stream

@pytest.fixture
def live(db_path):
    """The app under a real uvicorn (the TestClient delivers a streamed body only once it is
    complete, so it cannot cut one)."""
    with live_server(db_path, timeout=120) as c:
        yield c



def test_a_cut_trial_stream_stops_the_model(live, db, loras):
    """Closing the dialog (or the tab) cuts the stream; the model stops within a token instead of
    generating the rest of a long answer in the background."""
    from dialogue.local.process import get_model_process
    q, babble, long = "What is the capital of France?", {"strong": 2.0}, 120
    d = _local(db, "Cut")

    def start(max_tokens: int) -> str:
        r = live.post(f"/d/{d.id}/trials", data={"source": q, "max_tokens": str(max_tokens),
                                                  "a-on": list(babble), "a-scale:strong": "2"})
        assert r.status_code == 200, r.text
        return Tags(r.text).find("div", id="trial-out")[0]["sse-connect"]

    # this set babbles on: uncut, it runs to max tokens
    with live.stream("GET", start(long)) as r:
        events = dict(line_events(r.iter_lines()))
    assert "cut at max tokens" in events["end-a"]
    rt = get_model_process("default")  # the process the app's local model runs in
    prompt_tokens = rt.evaluated() - long

    # asked for far more, and cut after a few pieces
    with live.stream("GET", start(4000)) as r:
        n = 0
        for e, _ in line_events(r.iter_lines()):
            n += e == "text-a"
            if n == 3:
                break
    generated = rt.evaluated() - prompt_tokens  # answered once the cut generation let go
    assert generated < long, f"{generated} tokens were generated after the stream was cut"


# ---------------------------------------------------------------- run all

def test_run_all_runs_code_cells_in_order_with_live_cells_and_stops_at_an_error(client, db):
    d = db.create("Run all")
    cells = [db.add(d.id, "code", "x = 1"), db.add(d.id, "note", "# between"),
             db.add(d.id, "code", "x += 1\nprint(x)"), db.add(d.id, "prompt", "not run"),
             db.add(d.id, "code", "print(x * 10)")]
    r = client.post(f"/d/{d.id}/run_all", headers=HX)
    assert r.status_code == 200
    ctl = Tags(r.text).find("div", id="runall")[0]
    assert ctl["sse-connect"] == f"/d/{d.id}/run_all/stream?from=0" and "0 of 3" in r.text
    events = sse_events(client.get(ctl["sse-connect"]).text)
    names = [e for e, _ in events]
    assert names.count("cell") == 3 and names[-2:] == ["done", "close"]
    # each started cell is put in its running state, out of band, with its own stream
    for (e, data), m in zip([x for x in events if x[0] == "cell"], (cells[0], cells[2], cells[4])):
        res = Tags(data).find("div", id=f"r-{m.id}")[0]
        assert res["hx-swap-oob"] == "true" and res["sse-connect"] == f"/d/{d.id}/m/{m.id}/stream"
        assert Tags(data).find("div", id=f"g-{m.id}")
        assert "done" in [x for x, _ in sse_events(client.get(res["sse-connect"]).text)]
    assert [x for e, x in events if e == "progress"][-1].count("3 of 3") == 1
    assert "Ran 3 code cells" in dict(events)["done"] and 'data-act="run-all"' in dict(events)["done"]
    out = {m.id: db.message(d.id, m.id) for m in cells}
    assert [o.execution_count for o in (out[cells[0].id], out[cells[2].id], out[cells[4].id])] == [1, 2, 3]
    assert out[cells[4].id].outputs[0]["text"] == "20\n"
    assert out[cells[3].id].response == ""  # prompts are not part of Run all

    # an error stops it; the page hears why
    boom = db.add(d.id, "code", "raise ValueError('boom')", after=cells[0].id)
    r = client.post(f"/d/{d.id}/run_all", headers=HX)
    events = sse_events(client.get(Tags(r.text).find("div", id="runall")[0]["sse-connect"]).text)
    assert [e for e, _ in events].count("cell") == 2
    assert "stopped at code cell 2 of 4 (error)" in dict(events)["done"]
    assert db.message(d.id, cells[2].id).execution_count == 2  # not run again
    assert db.message(d.id, boom.id).meta["run"]["status"] == "error"
    empty = db.create("Nothing to run")
    assert client.post(f"/d/{empty.id}/run_all", headers=HX).status_code == 400


def test_run_all_can_be_stopped(client, db, tmp_path):
    d = db.create("Stop all")
    began = tmp_path / "began"
    slow = db.add(d.id, "code", f"import time\nopen({str(began)!r}, 'w').close()\n"
                                "for i in range(300): time.sleep(0.1)")
    after = db.add(d.id, "code", "print('never')")
    r = client.post(f"/d/{d.id}/run_all", headers=HX)
    assert r.status_code == 200
    twice = client.post(f"/d/{d.id}/run_all", headers=HX)
    assert twice.status_code == 409 and "already running" in twice.text
    deadline = time.monotonic() + 60
    while not began.exists():
        assert time.monotonic() < deadline, "the first cell did not start"
        time.sleep(0.1)
    # a reloaded page shows the Run all in flight, and streams only what it has not shown
    page = Tags(client.get(f"/d/{d.id}").text)
    assert page.find("div", id="runall")[0]["sse-connect"] == f"/d/{d.id}/run_all/stream?from=1"
    assert client.post(f"/d/{d.id}/run_all/stop", headers=HX).status_code == 204
    events = sse_events(client.get(f"/d/{d.id}/run_all/stream?from=1").text)
    assert [e for e, _ in events] == ["done", "close"] and "Run all was stopped" in events[0][1]
    assert db.message(d.id, slow.id).meta["run"]["status"] == "interrupted"
    assert db.message(d.id, after.id).execution_count is None and not db.message(d.id, after.id).outputs
