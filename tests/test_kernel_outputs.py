"""Folding a run's output stream into a list (`fold_output`, the one copy the kernel, the run
state and late listeners share) and the output cap, without a kernel: the semantics are
Jupyter's, and here is where the copies used to disagree."""
from __future__ import annotations

import copy
import json
import random

import nbformat

import re

from dialogue.kernel.outputs import (OutputCap, collapse_stream, fold_output, shown_stream,
                                     stored_outputs)


def stream(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def display(text: str, did: str | None = None) -> dict:
    out = {"output_type": "display_data", "data": {"text/plain": text}, "metadata": {}}
    if did:
        out["transient"] = {"display_id": did}
    return out


def update(text: str, did: str | None) -> dict:
    out = {"output_type": "update_display_data", "data": {"text/plain": text}, "metadata": {}}
    if did is not None:
        out["display_id"] = did
    return out


def texts(outputs: list[dict]) -> list[str]:
    return [o["text"] if o["output_type"] == "stream" else o["data"]["text/plain"] for o in outputs]


def test_an_update_without_a_display_id_changes_nothing():
    # The service used to match a missing id to every output that had none, and overwrite them.
    outs = [stream("printed\n"), display("plain"), display("shown", "a")]
    before = copy.deepcopy(outs)
    for item in (update("new", None), {"output_type": "update_display_data", "display_id": "",
                                       "data": {"text/plain": "new"}, "metadata": {}}):
        assert fold_output(outs, item) is False
        assert outs == before


def test_an_update_replaces_every_output_with_its_display_id_and_only_those():
    first, other, second = display("one", "a"), display("other", "b"), display("one again", "a")
    outs = [first, stream("x\n"), other, second]
    fold_output(outs, update("two", "a"))
    assert texts(outs) == ["two", "x\n", "other", "two"]
    assert [o["transient"]["display_id"] for o in (outs[0], outs[2], outs[3])] == ["a", "b", "a"]
    # replaced, not changed in place: the same dict may sit in another list (a snapshot)
    assert first["data"]["text/plain"] == "one" and second["data"]["text/plain"] == "one again"
    # the id may also come in the update's own transient, as Jupyter sends it
    fold_output(outs, {"output_type": "update_display_data", "transient": {"display_id": "b"},
                       "data": {"text/plain": "B"}, "metadata": {"m": 1}})
    assert texts(outs) == ["two", "x\n", "B", "two"] and outs[2]["metadata"] == {"m": 1}
    fold_output(outs, update("nobody", "zzz"))  # an id no output has: nothing
    assert texts(outs) == ["two", "x\n", "B", "two"]


def test_a_display_id_in_metadata_is_not_a_display_id():
    # The relay used to update outputs whose *metadata* carried a display_id; Jupyter keeps the
    # id only in `transient`, and nbformat outputs (what the store holds) have none.
    outs = [{"output_type": "display_data", "data": {"text/plain": "old"},
             "metadata": {"display_id": "a"}}]
    fold_output(outs, update("new", "a"))
    assert texts(outs) == ["old"]


def test_clear_output_with_wait_clears_when_the_next_output_arrives():
    outs = [stream("frame 1\n"), display("plot 1", "p")]
    pending = fold_output(outs, {"output_type": "clear_output", "wait": True})
    assert pending is True and texts(outs) == ["frame 1\n", "plot 1"]  # nothing blinks away
    # an update is not new output: it applies to what is shown and keeps the clear waiting
    pending = fold_output(outs, update("plot 1b", "p"), pending)
    assert pending is True and texts(outs) == ["frame 1\n", "plot 1b"]
    pending = fold_output(outs, stream("frame 2\n"), pending)
    assert pending is False and texts(outs) == ["frame 2\n"]
    # a plain clear empties at once, and one that was waiting is then spent
    pending = fold_output(outs, {"output_type": "clear_output", "wait": True})
    pending = fold_output(outs, {"output_type": "clear_output"}, pending)
    assert pending is False and outs == []
    fold_output(outs, stream("after\n"), pending)
    assert texts(outs) == ["after\n"]
    # unknown items change nothing and keep the state
    assert fold_output(outs, {"output_type": "execute_input"}, True) is True
    assert texts(outs) == ["after\n"]


def test_stored_form_joins_stream_chunks_and_drops_display_ids():
    folded = [stream("a"), stream("b"), stream("e", "stderr"), stream("c"), display("d", "x"),
              stream("f"), stream("g")]
    original = copy.deepcopy(folded)
    stored = stored_outputs(folded)
    assert [(o["output_type"], o.get("name"), o.get("text")) for o in stored] == [
        ("stream", "stdout", "ab"), ("stream", "stderr", "e"), ("stream", "stdout", "c"),
        ("display_data", None, None), ("stream", "stdout", "fg")]
    assert "transient" not in stored[3]
    assert folded == original  # the folded list (shared with followers) is left as it was
    nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=stored)]))


def run_cap(messages: list[tuple[str, dict]], cap: int = 1_000_000) -> tuple[OutputCap, list[dict], list[dict]]:
    """Feed IOPub messages to an OutputCap as the kernel does; return it, every item passed on,
    and the stored outputs."""
    cap_ = OutputCap(cap)
    items: list[dict] = []
    for mt, content in messages:
        items += cap_.add(mt, content)
    stored, last = cap_.finish()
    return cap_, items + last, stored


def follow(items: list[dict]) -> list[dict]:
    """What a follower of the run (the run state, a late page) shows: the items folded in order."""
    outs: list[dict] = []
    pending = False
    for item in items:
        pending = fold_output(outs, item, pending)
    return outs


def test_the_kernel_passes_on_a_waiting_clear_just_before_the_output_that_sets_it_off():
    msgs = [("stream", {"name": "stdout", "text": "old\n"}),
            ("clear_output", {"wait": True}),
            ("display_data", {"data": {"text/plain": "new"}, "metadata": {},
                              "transient": {"display_id": "p"}}),
            ("update_display_data", {"data": {"text/plain": "newer"}, "metadata": {},
                                     "transient": {"display_id": "p"}})]
    _, items, stored = run_cap(msgs)
    assert [i["output_type"] for i in items] == [
        "stream", "clear_output", "display_data", "update_display_data"]
    assert "wait" not in items[1] and items[2]["transient"] == {"display_id": "p"}
    assert stored == [{"output_type": "display_data", "data": {"text/plain": "newer"}, "metadata": {}}]
    assert stored_outputs(follow(items)) == stored


def test_a_clear_frees_the_caps_room_and_an_output_the_cap_drops_still_clears():
    big = "x" * 60
    msgs = []
    for i in range(5):  # a progress loop: each frame alone fits, all of them would not
        msgs += [("clear_output", {"wait": True}), ("stream", {"name": "stdout", "text": big + f"{i}\n"})]
    cap, items, stored = run_cap(msgs, cap=100)
    assert cap.cut == 0 and [o["text"] for o in stored] == [big + "4\n"]
    # a frame bigger than the whole cap is left out, but it still replaces the previous frame
    msgs += [("clear_output", {"wait": True}),
             ("display_data", {"data": {"text/plain": "y" * 500}, "metadata": {}})]
    cap, items, stored = run_cap(msgs, cap=100)
    assert cap.cut == len(json.dumps({"text/plain": "y" * 500}))
    assert [o["output_type"] for o in stored] == ["stream"] and "output capped" in stored[0]["text"]
    assert stored_outputs(follow(items)) == stored


def test_followers_agree_with_the_stored_outputs_on_any_stream_of_messages():
    """Random IOPub streams (prints on two streams, displays with and without ids, updates of
    known and unknown ids, clears with and without wait, results, errors), under a small cap:
    folding what the kernel passes on always gives what it stores."""
    rng = random.Random(13)
    for _ in range(300):
        msgs = []
        for _ in range(rng.randrange(1, 25)):
            did = rng.choice([None, "a", "b", "c"])
            kind = rng.choice(["stream", "stream", "display_data", "update_display_data",
                               "clear_output", "execute_result", "error", "status"])
            text = "".join(rng.choice("tttt\r\n\b") for _ in range(rng.randrange(0, 40)))
            if kind == "stream":
                msgs.append((kind, {"name": rng.choice(["stdout", "stderr"]), "text": text}))
            elif kind in ("display_data", "update_display_data", "execute_result"):
                c = {"data": {"text/plain": text}, "metadata": {}}
                if did:
                    c["transient"] = {"display_id": did}
                if kind == "execute_result":
                    c["execution_count"] = 1
                msgs.append((kind, c))
            elif kind == "clear_output":
                msgs.append((kind, {"wait": rng.random() < 0.5}))
            elif kind == "error":
                msgs.append((kind, {"ename": "E", "evalue": "v", "traceback": [text]}))
            else:
                msgs.append((kind, {"execution_state": "busy"}))
        cap, items, stored = run_cap(msgs, cap=rng.choice([50, 200, 10_000]))
        assert stored_outputs(follow(items)) == stored, msgs
        assert not any(i.get("wait") for i in items)
        assert all("transient" not in o for o in stored)


# ---------------------------------------------------------------- carriage returns, backspaces


def jupyterlab(text: str) -> str:
    """JupyterLab's `removeOverwrittenChars` (packages/outputarea/src/model.ts), ported with
    JavaScript's regex meanings (`.` stops at \\r as at \\n, and in multiline mode `^` and `$`
    match at both): the reference for what a stream shows."""
    bol, eol, dot = r"(?:^|(?<=[\n\r]))", r"(?=[\n\r]|\Z)", r"[^\n\r]"
    tmp = text
    while True:  # fixBackspace
        text = tmp
        tmp = re.sub(r"[^\n]\x08", "", text)
        if len(tmp) == len(text):
            break
    text = re.sub(r"\r+\n", "\n", text)  # fixCarriageReturn
    while re.search(r"\r[^$]", text):
        base = re.search(bol + f"({dot}*)\\r+", text).group(1)
        insert = re.search(f"\\r+({dot}*)" + eol, text).group(1)
        insert = insert + base[len(insert):]
        text = re.sub(f"\\r+{dot}*" + eol, "\r", text, count=1)
        text = re.sub(bol + f"{dot}*\\r", lambda _: insert, text, count=1)
    # a last \\r shows nothing; a backspace with nothing before it on its line deletes nothing,
    # and JupyterLab leaves it in the text, where a page shows nothing for it either
    return (text[:-1] if text.endswith("\r") else text).replace("\b", "")


def test_carriage_returns_and_backspaces_are_applied_as_jupyterlab_applies_them():
    assert shown_stream("  0%\r 50%\r100%\ndone\n") == "100%\ndone\n"
    assert shown_stream("Downloading 10 of 10\rDone") == "Doneloading 10 of 10"
    assert shown_stream("Downloading 10 of 10\r\x1b[2KDone") == "Done"  # rich / pip erase the line
    assert shown_stream("a\r\nb\r\n") == "a\nb\n"
    assert shown_stream("abc\b\bX\n\bq") == "aX\nq"  # a backspace never crosses a line
    # colour codes stay, with the characters they colour
    assert shown_stream("\x1b[31mbad\x1b[0m\r\x1b[32mgood\x1b[0m") == "\x1b[0m\x1b[32mgood\x1b[0m"
    rng = random.Random(5)
    for _ in range(2000):  # the reference has no escape codes and mixes no \r with \b
        alphabet = rng.choice(["ab\r\n", "ab\b\n", "abc \r\r\n"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        if "\b\b" in text:  # JupyterLab's regex lets a backspace delete the backspace before it
            continue
        assert shown_stream(text) == jupyterlab(text), repr(text)
    assert shown_stream("ab\b\b\b!") == "!"  # three back from two: the line is empty


def test_a_stream_collapses_the_same_however_the_kernel_split_it():
    """The chunks a kernel sends may end anywhere: on a \\r, before the \\b that takes back
    their last character, inside an escape code. Folding them one by one gives what collapsing
    the whole stream gives, and the stored form collapses to itself."""
    rng = random.Random(7)
    pieces = ["a", "b", "xyz", " ", "\r", "\n", "\b", "\x1b[31m", "\x1b[0m", "\x1b[2K", "\x1b[K",
              "\r\n", "\x1b[?25l", "\x1b[3G"]
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 25)))
        whole = collapse_stream(text)
        assert collapse_stream(whole) == whole, repr(text)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(0, 6))))
        outs: list[dict] = []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            if a < b:
                fold_output(outs, stream(text[a:b]))
        got = outs[0]["text"] if outs else ""
        assert shown_stream(got) == shown_stream(whole), (repr(text), cuts)


def test_a_progress_bar_redrawn_many_times_is_one_line_and_costs_one_line_of_the_cap():
    msgs = [("stream", {"name": "stdout", "text": f"\rstep {i}"}) for i in range(5000)]
    msgs.append(("stream", {"name": "stdout", "text": "\ndone\n"}))
    msgs.insert(10, ("stream", {"name": "stderr", "text": "warning\n"}))
    cap, items, stored = run_cap(msgs, cap=200)  # 5000 redraws are 50,000 characters
    assert cap.cut == 0
    assert [(o["name"], o["text"]) for o in stored] == [
        ("stdout", "step 9"), ("stderr", "warning\n"), ("stdout", "step 4999\ndone\n")]
    assert stored_outputs(follow(items)) == stored
