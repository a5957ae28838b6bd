"""Headless runs, import and export from the command line: a real kernel, real files."""
import importlib.util
import json
import os
import subprocess
import sys

import nbformat
import pytest


def run(db, *args, cwd=None):
    env = {**os.environ, "DIALOGUE_DB": str(db), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=cwd)


def notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(c[2:]) if c.startswith("# ") else nbformat.v4.new_code_cell(c)
                for c in cells]
    nbformat.write(nb, path)
    return path


def test_run_notebook_file_writes_executed_copy(tmp_path):
    src = notebook(tmp_path / "nb.ipynb", "# A title", "x = 6 * 7\nprint('x is', x)", "x",
                   "from IPython.display import HTML\nHTML('<b>bold</b>')")
    r = run(tmp_path / "user.db", "run", str(src), "-o", str(tmp_path / "out.ipynb"))
    assert r.returncode == 0, r.stderr
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    nbformat.validate(out)
    code = [c for c in out.cells if c.cell_type == "code"]
    assert code[0].outputs[0].text == "x is 42\n"
    assert code[1].outputs[0].data["text/plain"] == "42" and code[1].execution_count == 2
    assert code[2].outputs[0].data["text/html"] == "<b>bold</b>"
    # the user's own database was not touched by a file run
    assert "no dialogues" in run(tmp_path / "user.db", "list").stdout
    # the source file is unchanged
    assert nbformat.read(src, as_version=4).cells[1].outputs == []


def test_run_stops_at_first_error_unless_allowed(tmp_path):
    src = notebook(tmp_path / "e.ipynb", "print('one')", "raise KeyError('boom')", "print('three')")
    r = run(tmp_path / "u.db", "run", str(src), "-o", str(tmp_path / "o.ipynb"))
    assert r.returncode == 1 and "KeyError" in r.stderr and "Traceback" not in r.stderr
    cells = nbformat.read(tmp_path / "o.ipynb", as_version=4).cells
    assert cells[1].outputs[0].ename == "KeyError" and cells[2].outputs == []
    r = run(tmp_path / "u.db", "run", str(src), "-o", str(tmp_path / "o.ipynb"), "--allow-errors")
    assert r.returncode == 0, r.stderr
    cells = nbformat.read(tmp_path / "o.ipynb", as_version=4).cells
    assert cells[2].outputs[0].text == "three\n"


def test_run_goes_on_in_a_fresh_kernel_after_a_death_with_allow_errors(tmp_path):
    src = notebook(tmp_path / "k.ipynb", "x = 1", "import os; os._exit(3)",
                   "print('alive', 'x' in dir())")
    r = run(tmp_path / "u.db", "run", str(src), "-o", str(tmp_path / "o.ipynb"), "--allow-errors")
    assert r.returncode == 0, r.stderr
    assert "kernel exited" in r.stderr.lower()
    cells = nbformat.read(tmp_path / "o.ipynb", as_version=4).cells
    assert cells[2].outputs[0].text == "alive False\n"


def test_run_stored_dialogue_records_outputs(tmp_path):
    db = tmp_path / "s.db"
    assert run(db, "new", "calc").returncode == 0
    run(db, "add", "calc", "--code", "y = 2 ** 10")
    run(db, "add", "calc", "--note", "just a note")
    run(db, "add", "calc", "--code", "print(y)")
    r = run(db, "run", "calc")
    assert r.returncode == 0, r.stderr
    shown = json.loads(run(db, "show", "calc", "--json").stdout)
    assert shown["messages"][2]["outputs"][0]["text"] == "1024\n"
    assert "1024" in run(db, "show", "calc").stdout


def test_import_then_export_round_trip_and_module(tmp_path):
    db = tmp_path / "i.db"
    src = notebook(tmp_path / "lib.ipynb", "#| export\ndef double(x):\n    return 2 * x",
                   "double(4)", "# Docs")
    r = run(db, "import", str(src))
    assert r.returncode == 0 and "3 messages" in r.stdout, r.stderr
    again = run(db, "import", str(src))
    assert again.returncode == 1 and "--name" in again.stderr
    assert run(db, "import", str(src), "--name", "lib2").returncode == 0
    r = run(db, "export", "lib", "--to", "py", "-o", str(tmp_path / "mylib.py"))
    assert r.returncode == 0, r.stderr
    spec = importlib.util.spec_from_file_location("mylib", tmp_path / "mylib.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.double(21) == 42
    for fmt in ("ipynb", "md", "html"):
        r = run(db, "export", "lib", "--to", fmt, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / f"lib.{fmt}").exists()
    back = nbformat.read(tmp_path / "lib.ipynb", as_version=4)
    assert [c.source for c in back.cells] == [c.source for c in nbformat.read(src, as_version=4).cells]


def test_bad_notebook_creates_nothing(tmp_path):
    db = tmp_path / "b.db"
    (tmp_path / "trunc.ipynb").write_text('{"cells": [{"cell_type": "code", "sou')
    r = run(db, "import", str(tmp_path / "trunc.ipynb"))
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "nocells.ipynb").write_text('{"metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    r = run(db, "import", str(tmp_path / "nocells.ipynb"))
    assert r.returncode == 1 and "cells" in r.stderr
    r = run(db, "run", str(tmp_path / "missing.ipynb"))
    assert r.returncode == 1 and "missing.ipynb" in r.stderr
    assert "no dialogues" in run(db, "list").stdout


def test_headless_run_answers_prompts_with_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    db = tmp_path / "p.db"
    assert run(db, "new", "qa", "--model", "local:default").returncode == 0
    run(db, "add", "qa", "--code", "capital = 'Paris'")
    run(db, "add", "qa", "--prompt", "What is the capital of France? One word.")
    r = run(db, "run", "qa")
    assert r.returncode == 0, r.stderr
    msgs = json.loads(run(db, "show", "qa", "--json").stdout)["messages"]
    assert "Paris" in msgs[1]["response"] and msgs[1]["usage"]["output"] > 0
    # exported and run again as a notebook file: the prompt is answered there too
    run(db, "export", "qa", "--to", "ipynb", "-o", str(tmp_path / "qa.ipynb"))
    r = run(db, "run", str(tmp_path / "qa.ipynb"), "-o", str(tmp_path / "qa.out.ipynb"))
    assert r.returncode == 0, r.stderr
    from dialogue.artifacts import read_notebook
    done = read_notebook(tmp_path / "qa.out.ipynb")
    assert "Paris" in done.messages[1].response


def test_ask_streams_an_answer_with_no_key_and_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    for k in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db = tmp_path / "a.db"
    run(db, "new", "ask")
    r = run(db, "ask", "ask", "Name the largest planet in the solar system.")
    assert r.returncode == 0, r.stderr
    assert "Jupiter" in r.stdout and "local:default" in r.stderr
    r = run(db, "ask", "nope", "hi")
    assert r.returncode == 1 and "no dialogue named 'nope'" in r.stderr


def test_run_numbers_failures_by_position_among_all_messages(tmp_path):
    """One numbering: a failure is named by the position `dialogue show` gives the message (notes
    counted), which every MSG argument accepts."""
    src = notebook(tmp_path / "n.ipynb", "# Title", "# More prose", "x = 1",
                   "raise ValueError('boom')")
    r = run(tmp_path / "u.db", "run", str(src), "-o", str(tmp_path / "o.ipynb"))
    assert r.returncode == 1
    assert "message 4 (" in r.stderr and "failed" in r.stderr and "message 2 (" not in r.stderr
    db = tmp_path / "d.db"
    run(db, "new", "calc")
    run(db, "add", "calc", "--note", "intro")
    run(db, "add", "calc", "--code", "1/0")
    r = run(db, "run", "calc")
    assert r.returncode == 1 and "message 2 (" in r.stderr and "ZeroDivisionError" in r.stderr
    assert "ZeroDivisionError" in run(db, "show", "calc").stdout.split("2 code")[-1]
