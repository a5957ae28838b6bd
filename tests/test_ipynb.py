"""Notebooks in and out: lossless round trips on real notebooks, solveit dialogs, our own prompt
cells, and every kind of bad input refused with a clear error."""
from __future__ import annotations

import copy
import io
import json
import os
import tracemalloc
from pathlib import Path

import nbformat
import pytest

from dialogue.artifacts.ipynb import (DEFAULT_MAX_BYTES, SEPARATOR, NotebookError,
                                      NotebookTooLarge, NotebookVersionError, read_notebook,
                                      split_prompt, to_ipynb_bytes, write_notebook)
from dialogue.document import ContextItem, Dialogue, Kind, Message

DATA = Path(__file__).parent / "data" / "notebooks"
REAL = ["nbformat_test4.5.ipynb", "nbformat_test3.ipynb", "nbconvert_attachment.ipynb",
        "ipywidgets_Widget_List.ipynb", "nbconvert_notebook2.ipynb", "nbconvert_svg.ipynb",
        "nbconvert_notebook4_jpeg.ipynb", "llama_cpp_python_Guidance.ipynb", "generated.ipynb"]
_TRANSIENT = ("orig_nbformat", "orig_nbformat_minor", "signature")


def canonical(nb: nbformat.NotebookNode, *, ids: bool) -> dict:
    """What 'semantically equal' means for two notebooks: the same notebook metadata (less our
    `dialogue` key and what nbformat itself treats as transient), and the same cells with the
    same type, source, metadata, outputs, execution counts and attachments (ids when asked)."""
    meta = {k: v for k, v in nb.metadata.items() if k not in _TRANSIENT and k != "dialogue"}
    cells = []
    for c in nb.cells:
        d = {"cell_type": c.cell_type, "source": c.source, "metadata": c.get("metadata", {}),
             "attachments": c.get("attachments")}
        if c.cell_type == "code":
            d.update(outputs=c.outputs, execution_count=c.execution_count)
        if ids:
            d["id"] = c.get("id")
        cells.append(d)
    return json.loads(json.dumps({"metadata": meta, "cells": cells}))


def _had_ids(path: Path) -> bool:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return raw.get("nbformat_minor", 0) >= 5 and all("id" in c for c in raw.get("cells", []))


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", REAL)
def test_real_notebook_round_trip_is_lossless(name):
    path = DATA / name
    assert path.stat().st_size < 300_000
    original = nbformat.read(path, as_version=4)
    d = read_notebook(path)
    out = to_ipynb_bytes(d)
    back = nbformat.reads(out.decode("utf-8"), as_version=4)
    nbformat.validate(back)
    assert back.nbformat == 4 and back.nbformat_minor == 5
    ids = _had_ids(path)
    assert canonical(back, ids=ids) == canonical(original, ids=ids)
    # and again: a second import/export changes nothing at all
    again = to_ipynb_bytes(read_notebook(out))
    assert canonical(nbformat.reads(again.decode(), as_version=4), ids=True) == \
        canonical(back, ids=True)


def test_the_lossless_check_can_fail():
    """canonical() must notice a changed output, metadata value or attachment."""
    path = DATA / "generated.ipynb"
    original = canonical(nbformat.read(path, as_version=4), ids=True)
    for mutate in (lambda d: d.messages[3].outputs[0].update(text="changed\n"),
                   lambda d: d.messages[2].meta.update(tags=["x"]),
                   lambda d: d.messages[1].attachments["gradient.png"].update(
                       {"image/png": "AA=="}),
                   lambda d: d.meta["kernelspec"].update(name="other")):
        d = read_notebook(path)
        mutate(d)
        back = nbformat.reads(to_ipynb_bytes(d).decode(), as_version=4)
        assert canonical(back, ids=True) != original


def test_generated_notebook_reads_into_messages():
    d = read_notebook(DATA / "generated.ipynb")
    assert d.name == "generated"
    kinds = [m.kind for m in d.messages]
    assert kinds[:3] == [Kind.raw, Kind.note, Kind.code] and kinds[-1] == Kind.note
    note = d.messages[1]
    assert set(note.attachments) == {"gradient.png"}
    assert note.attachments["gradient.png"]["image/png"].startswith("iVBOR")
    export, prints, image, svg, html, md, error, exports = d.messages[2:10]
    assert export.exported and exports.exported and not prints.exported
    assert [o["name"] for o in prints.outputs] == ["stdout", "stderr"]
    assert prints.outputs[0]["text"] == "to stdout 42\n"
    assert image.outputs[0]["output_type"] == "display_data"
    assert "image/png" in image.outputs[0]["data"]
    assert "image/svg+xml" in svg.outputs[0]["data"]
    assert "<script>" in html.outputs[0]["data"]["text/html"]  # kept as data; renderers sanitize
    assert md.outputs[0]["data"]["text/markdown"] == "**bold** output with `code`"
    assert error.outputs[0]["ename"] == "ZeroDivisionError" and error.execution_count > 0
    assert d.meta["kernelspec"]["name"] == "python3"


def test_widget_state_and_views_are_kept():
    d = read_notebook(DATA / "ipywidgets_Widget_List.ipynb")
    state = d.meta["widgets"]["application/vnd.jupyter.widget-state+json"]
    assert state["state"]  # the saved widget models
    views = [o for m in d.messages for o in m.outputs
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 41
    nb = write_notebook(d)
    assert nb.metadata["widgets"] == d.meta["widgets"]


def test_nbformat3_is_upgraded():
    d = read_notebook(DATA / "nbformat_test3.ipynb")
    assert all(m.kind in (Kind.code, Kind.note, Kind.raw) for m in d.messages)
    assert d.messages[0].source.startswith("# ")  # v3 heading cells become markdown headings
    assert "orig_nbformat" not in d.meta and "name" not in d.meta
    assert write_notebook(d).nbformat_minor == 5


def test_cell_ids_kept_or_fresh():
    path = DATA / "nbformat_test4.5.ipynb"
    raw_ids = [c["id"] for c in json.loads(path.read_text())["cells"]]
    assert [m.id for m in read_notebook(path).messages] == raw_ids
    fresh = read_notebook(path, keep_ids=False)
    assert not set(m.id for m in fresh.messages) & set(raw_ids)
    assert [m.source for m in fresh.messages] == [m.source for m in read_notebook(path).messages]


def test_duplicate_and_missing_cell_ids_are_repaired():
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "markdown", "id": "abcd1234", "metadata": {}, "source": "a"},
        {"cell_type": "markdown", "id": "abcd1234", "metadata": {}, "source": "b"},
        {"cell_type": "markdown", "metadata": {}, "source": "c"}]}
    d = read_notebook(nb)
    ids = [m.id for m in d.messages]
    assert ids[0] == "abcd1234" and len(set(ids)) == 3
    nbformat.validate(write_notebook(d))


@pytest.mark.parametrize("cid", ["1", "-1", "0002", "12345678", "same", "ABCD1234", "abcd12345",
                                 "abc-1234", "a" * 64])
def test_cell_ids_that_are_not_ours_are_replaced(cid):
    """Only ids shaped like ours (8 lower-case hex digits, not all digits) are kept: a cell id "1"
    would otherwise be read as position 1, and odd ids would end up in URLs."""
    nb = {"nbformat": 4, "nbformat_minor": 5, "cells": [
        {"cell_type": "code", "id": cid, "metadata": {}, "source": "x", "outputs": [],
         "execution_count": None},
        {"cell_type": "code", "id": "0a1b2c3d", "metadata": {}, "source": "y", "outputs": [],
         "execution_count": None}],
        "metadata": {"dialogue": {"id": "../d/0a1b2c3d", "name": "n"}}}
    d = read_notebook(nb)
    assert d.messages[0].id != cid and len(d.messages[0].id) == 8
    assert not d.messages[0].id.isdigit() and int(d.messages[0].id, 16) >= 0
    assert d.messages[1].id == "0a1b2c3d"
    assert d.id != "../d/0a1b2c3d" and "/" not in d.id


# ---------------------------------------------------------------- our own dialogues

def _rich_dialogue() -> Dialogue:
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
           "AAAABJRU5ErkJggg==")
    return Dialogue(
        name="rich one", model="claude-sonnet-4-5", system="Be brief.",
        context=[ContextItem(name="docs", content="API docs", kind="url", source="https://x")],
        meta={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        messages=[
            Message(kind=Kind.note, source="# Title\n\n![p](attachment:p.png)", pinned=True,
                    attachments={"p.png": {"image/png": png}}, meta={"tags": ["intro"]}),
            Message(kind=Kind.code, source="def f(x):\n    return x", exported=True),
            Message(kind=Kind.code, source="#| export\ndef g(): pass", exported=False),
            Message(kind=Kind.code, source="f(2)", execution_count=3, collapsed=True, hidden=True,
                    outputs=[{"output_type": "execute_result", "execution_count": 3,
                              "metadata": {}, "data": {"text/plain": "2"}}]),
            Message(kind=Kind.prompt, source="What is f?\n", response="\nThe identity.\n",
                    tool_calls=[{"id": "t1", "name": "read", "arguments": {"p": "x"},
                                 "result": "ok"}],
                    usage={"input": 10, "output": 5, "model": "claude-sonnet-4-5", "cost": 0.001},
                    pinned=True, collapsed=True),
            Message(kind=Kind.prompt, source="Unanswered", hidden=True),
            Message(kind=Kind.prompt, source="Quote the separator:" + SEPARATOR + "like that",
                    response="Done."),
            Message(kind=Kind.prompt, source="", response="Answer with no prompt"),
            Message(kind=Kind.raw, source="---\ntitle: x\n---",
                    meta={"raw_mimetype": "text/markdown"}, exported=True),
            Message(kind=Kind.note, source="odd", response="r",
                    outputs=[{"output_type": "stream", "name": "stdout", "text": "x"}]),
            Message(kind=Kind.code, source="print(1)", attachments={"a.txt": {"text/plain": "hi"}}),
        ])


def test_dialogue_round_trip_is_exact():
    d = _rich_dialogue()
    back = read_notebook(to_ipynb_bytes(d))
    assert (back.name, back.id, back.model, back.system) == (d.name, d.id, d.model, d.system)
    assert [c.to_dict() for c in back.context] == [c.to_dict() for c in d.context]
    assert back.meta == d.meta
    assert len(back.messages) == len(d.messages)
    for a, b in zip(d.messages, back.messages, strict=True):
        assert b.id == a.id
        assert b.state() == a.state(), a.id


def test_exported_prompt_cells_read_well_in_jupyter():
    d = _rich_dialogue()
    nb = write_notebook(d)
    nbformat.validate(nb)
    cell = nb.cells[4]
    assert cell.cell_type == "markdown"
    assert cell.source == "What is f?\n" + SEPARATOR + "\nThe identity.\n"
    assert cell.metadata["solveit_ai"] is True and cell.metadata["pinned"] is True
    assert cell.metadata["collapsed"] is True
    assert cell.metadata["dialogue"]["tool_calls"][0]["name"] == "read"
    assert "response" not in cell.metadata["dialogue"]  # the answer lives in the source only
    assert nb.cells[5].source == "Unanswered" and nb.cells[5].metadata["skipped"] is True
    # flags without a directive, and a directive without the flag, are both recorded
    assert nb.cells[1].metadata["is_exported"] is True
    assert nb.cells[2].metadata["is_exported"] is False
    assert nb.metadata["dialogue"]["name"] == "rich one"


def test_prompt_edited_in_jupyter_is_split_again():
    d = _rich_dialogue()
    nb = write_notebook(d)
    nb.cells[4].source = "What is f, really?" + SEPARATOR + "An edited answer."
    back = read_notebook(json.loads(nbformat.writes(nb)))
    p = back.messages[4]
    assert (p.kind, p.source, p.response) == (Kind.prompt, "What is f, really?",
                                              "An edited answer.")
    assert p.tool_calls == d.messages[4].tool_calls


def test_split_prompt_forms():
    assert split_prompt("q" + SEPARATOR + "a") == ("q", "a")
    assert split_prompt("q\n" + SEPARATOR + "\na") == ("q\n", "\na")
    assert split_prompt("q\n##### Reply<!-- SOLVEIT_SEPARATOR_abc123ef -->\na") == ("q", "a")
    assert split_prompt("just a question") == ("just a question", "")


def test_reserved_metadata_key_refused_on_write():
    d = Dialogue(name="x", messages=[Message(kind=Kind.note, source="a",
                                             meta={"dialogue": {"kind": "prompt"}})])
    with pytest.raises(NotebookError, match="reserved"):
        write_notebook(d)


def test_malformed_output_refused_on_write():
    d = Dialogue(name="x", messages=[Message(kind=Kind.code, source="1",
                                             outputs=[{"output_type": "stream"}])])
    with pytest.raises(NotebookError, match="message 1"):
        write_notebook(d)


# ---------------------------------------------------------------- solveit

def test_solveit_dialog_imports_prompts_answers_and_flags():
    d = read_notebook(DATA / "solveit_dialog.ipynb")
    m = {x.id: x for x in d.messages}
    assert [x.kind.value for x in d.messages] == ["note", "code", "code", "prompt", "prompt",
                                                   "note", "code", "prompt"]
    assert m["a1b2c3d4"].pinned and m["a1b2c3d4"].meta == {}
    assert m["b2c3d4e5"].exported and m["b2c3d4e5"].meta == {
        "time_run": "2026-01-21T07:01:40.100000+00:00"}
    assert m["c3d4e5f6"].collapsed and m["c3d4e5f6"].outputs[0]["data"]["text/plain"] \
        == "{'INFO': 2, 'ERROR': 1}"
    ask = m["d4e5f6a7"]
    assert ask.source == "How many errors are in `app.log`? Use &`count_levels`."
    assert ask.response.startswith("Let me count them.\n\n<details class='tool-usage-details'>")
    assert ask.response.endswith("There is **one** `ERROR` line.")
    assert "solveit_ai" not in ask.meta and ask.meta["time_run"].startswith("2026-01-21")
    assert m["e5f6a7b8"].hidden and m["e5f6a7b8"].response == ""
    assert m["f6a7b8c9"].hidden and m["f6a7b8c9"].kind == Kind.note
    assert m["a7b8c9d0"].hidden and m["a7b8c9d0"].meta == {"hide_input": True}
    legacy = m["b8c9d0e1"]
    assert legacy.pinned and legacy.source == "Summarise the approach."
    assert legacy.response == "Split each line, take the level, count with `Counter`."
    assert d.meta["solveit_dialog_mode"] == "learning" and d.meta["solveit_ver"] == 2
    # visible to the model: everything but the skipped ones
    assert [x.id for x in d.messages if not x.hidden] == ["a1b2c3d4", "b2c3d4e5", "c3d4e5f6",
                                                          "d4e5f6a7", "b8c9d0e1"]


def test_solveit_dialog_written_back_keeps_solveit_conventions():
    d = read_notebook(DATA / "solveit_dialog.ipynb")
    nb = write_notebook(d)
    src = json.loads((DATA / "solveit_dialog.ipynb").read_text(encoding="utf-8"))
    by_id = {c.id: c for c in nb.cells}
    ask = by_id["d4e5f6a7"]
    assert ask.source == "".join(src["cells"][3]["source"])  # same separator, same bytes
    assert ask.metadata["solveit_ai"] is True
    assert by_id["e5f6a7b8"].metadata["skipped"] is True
    assert by_id["a7b8c9d0"].metadata["skipped"] is True  # 1 normalised to true
    assert by_id["a1b2c3d4"].metadata == {"pinned": True}
    # apart from that 1 -> true and the legacy separator written in today's form, the whole
    # notebook comes back as it was
    original = nbformat.read(DATA / "solveit_dialog.ipynb", as_version=4)
    original.cells[6].metadata["skipped"] = True
    assert "##### Reply<!-- SOLVEIT_SEPARATOR_abc123ef -->" in original.cells[7].source
    original.cells[7].source = "Summarise the approach." + SEPARATOR + \
        "Split each line, take the level, count with `Counter`."
    back = nbformat.reads(to_ipynb_bytes(d).decode(), as_version=4)
    assert canonical(back, ids=True) == canonical(original, ids=True)


def test_newer_solveit_notebook_metadata_kept():
    nb = {"nbformat": 4, "nbformat_minor": 5, "cells": [
        {"cell_type": "markdown", "id": "p1", "metadata": {"solveit_ai": True},
         "source": ["Hi?\n", "\n", "##### 🤖Reply🤖<!-- SOLVEIT_SEPARATOR_7f3a9b2c -->\n", "\n",
                    "Hello."]}],
          "metadata": {"solveit": {"default_code": True, "mode": "learning", "use_thinking": True,
                                   "use_tools": True, "ver": 2}}}
    d = read_notebook(nb)
    assert d.messages[0].kind == Kind.prompt and d.messages[0].response == "Hello."
    assert write_notebook(d).metadata["solveit"] == nb["metadata"]["solveit"]


# ---------------------------------------------------------------- bad input

def _notebook_bytes() -> bytes:
    return (DATA / "generated.ipynb").read_bytes()


def test_truncated_json_refused(tmp_path):
    raw = _notebook_bytes()
    p = tmp_path / "cut.ipynb"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(NotebookError, match=r"truncated JSON .* line \d+, column \d+") as e:
        read_notebook(p)
    assert str(p) in str(e.value)


def test_garbage_refused():
    with pytest.raises(NotebookError, match="invalid JSON"):
        read_notebook(b"{'cells': []}")
    with pytest.raises(NotebookError, match="empty"):
        read_notebook(b"  \n")
    with pytest.raises(NotebookError, match="UTF-8"):
        read_notebook(b"\xff\xfe\x00{")
    with pytest.raises(NotebookError, match="top level is a list"):
        read_notebook(b"[1, 2]")
    with pytest.raises(NotebookError, match="no 'nbformat' version"):
        read_notebook(b'{"cells": []}')


def test_missing_cells_refused():
    nb = json.loads(_notebook_bytes())
    del nb["cells"]
    with pytest.raises(NotebookError, match="'cells' list is missing"):
        read_notebook(json.dumps(nb).encode())
    nb["cells"] = {"not": "a list"}
    with pytest.raises(NotebookError, match="'cells' is a dict"):
        read_notebook(json.dumps(nb).encode())


@pytest.mark.parametrize("major,minor", [(5, 0), (5, 1), (6, 0)])
def test_newer_nbformat_major_refused(major, minor):
    nb = json.loads(_notebook_bytes())
    nb["nbformat"], nb["nbformat_minor"] = major, minor
    with pytest.raises(NotebookVersionError, match=rf"nbformat {major}\.{minor} is newer .* 4\.x"):
        read_notebook(json.dumps(nb).encode())


def test_future_minor_of_v4_still_reads_known_cells():
    nb = json.loads(_notebook_bytes())
    nb["nbformat_minor"] = 9
    assert len(read_notebook(nb).messages) == len(nb["cells"])


def test_unknown_cell_type_refused():
    with pytest.raises(NotebookError, match="cell 3 has cell_type 'heading'"):
        read_notebook(DATA / "nbformat_invalid.ipynb")


def test_schema_violation_refused_with_its_place():
    nb = json.loads(_notebook_bytes())
    del nb["cells"][3]["outputs"][0]["name"]
    with pytest.raises(NotebookError, match=r"cell 4\['outputs'\]\[0\]: .*'name'"):
        read_notebook(nb)


def test_nbformat3_without_worksheets_refused():
    with pytest.raises(NotebookError, match="'worksheets' is missing"):
        read_notebook(b'{"nbformat": 3, "nbformat_minor": 0, "metadata": {}}')
    with pytest.raises(NotebookError, match="worksheet 1 has no 'cells'"):
        read_notebook(b'{"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": [{}]}')


def test_bad_dialogue_metadata_refused():
    nb = json.loads(_notebook_bytes())
    nb["cells"][1]["metadata"]["dialogue"] = {"kind": "prompt", "tool_calls": "nope"}
    with pytest.raises(NotebookError, match=r"cell 2: metadata.dialogue.tool_calls must be list"):
        read_notebook(nb)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(NotebookError, match="no such file"):
        read_notebook(tmp_path / "nope.ipynb")
    with pytest.raises(NotebookError, match="is a directory"):
        read_notebook(tmp_path)


def test_200mb_file_refused_from_its_size(tmp_path):
    """A 200 MB upload is refused before a byte of it is read: the file is sparse (no disk
    used), and memory stays far below its size while read_notebook looks at it."""
    big = tmp_path / "big.ipynb"
    with big.open("wb") as f:
        f.truncate(200 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(NotebookTooLarge, match=r"200\.0 MiB is larger than the 100\.0 MiB"):
            read_notebook(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024
    assert DEFAULT_MAX_BYTES == 100 * 1024 * 1024


class _Endless(io.RawIOBase):
    """A 200 MB upload arriving as a stream (e.g. an HTTP body), produced on demand."""

    def __init__(self, size: int) -> None:
        self.left, self.served = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = b" " * n
        self.left -= n
        self.served += n
        return n


def test_200mb_stream_refused_after_the_limit():
    stream = _Endless(200 * 1024 * 1024)
    limit = 8 * 1024 * 1024
    with pytest.raises(NotebookTooLarge, match="larger than the 8.0 MiB limit"):
        read_notebook(io.BufferedReader(stream), max_bytes=limit)
    assert stream.served <= limit + 2 * 1024 * 1024  # stopped at the limit, not at 200 MB


def test_oversized_bytes_refused():
    with pytest.raises(NotebookTooLarge, match="larger than the"):
        read_notebook(_notebook_bytes(), max_bytes=1000)


def test_custom_limit_allows_exactly_the_limit(tmp_path):
    raw = _notebook_bytes()
    p = tmp_path / "n.ipynb"
    p.write_bytes(raw)
    assert read_notebook(p, max_bytes=len(raw)).messages
    with pytest.raises(NotebookTooLarge):
        read_notebook(p, max_bytes=len(raw) - 1)
    with open(p, "rb") as f:
        assert read_notebook(f, max_bytes=len(raw)).name == "n"


def test_text_stream_and_errors_are_value_errors():
    assert read_notebook(io.StringIO(_notebook_bytes().decode())).messages
    text = _notebook_bytes().decode()
    assert read_notebook(text).name == "notebook"  # JSON text, not a path
    assert read_notebook(str(DATA / "generated.ipynb")).name == "generated"
    with pytest.raises(NotebookTooLarge):
        read_notebook(text, max_bytes=100)
    assert issubclass(NotebookError, ValueError)
    assert issubclass(NotebookTooLarge, NotebookError)
    with pytest.raises(TypeError):
        read_notebook(42)  # type: ignore[arg-type]


def test_input_dict_is_not_modified():
    nb = json.loads(_notebook_bytes())
    before = copy.deepcopy(nb)
    read_notebook(nb)
    assert nb == before
    assert os.fspath(DATA)  # sanity: data folder exists


def test_fresh_kernel_outputs_round_trip(tmp_path):
    """Regenerate the generated notebook in a real ipykernel (tests/data/notebooks/generate.py)
    and round-trip what the kernel produced today, not only the stored copy."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("nb_generate", DATA / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    nb = gen.run(gen.CELLS)
    path = tmp_path / "fresh.ipynb"
    nbformat.write(nb, path)
    d = read_notebook(path)
    assert d.messages[8].outputs[0]["ename"] == "ZeroDivisionError"
    back = nbformat.reads(to_ipynb_bytes(d).decode(), as_version=4)
    assert canonical(back, ids=True) == canonical(nbformat.read(path, as_version=4), ids=True)


def test_a_saved_progress_bar_is_stored_as_jupyter_shows_it():
    """A notebook saved with a progress bar's raw text (every redraw, \r between them) is stored
    as its last state, as JupyterLab keeps it once it opened the file; other text is kept as is."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr",
                               text="".join(f"\r{i:3d}%|{'#' * (i // 10)}" for i in range(101)) + "\n"),
        nbformat.v4.new_output("stream", name="stdout", text="\x1b[32mok\x1b[0m\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": "a\rb"}, execution_count=1)]
    nb.cells = [cell]
    outs = read_notebook(nbformat.writes(nb)).messages[0].outputs
    assert outs[0]["text"] == "100%|##########\n"
    assert outs[1]["text"] == "\x1b[32mok\x1b[0m\n" and outs[2]["data"]["text/plain"] == "a\rb"
