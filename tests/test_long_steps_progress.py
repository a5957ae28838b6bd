"""Long steps report through one convention (`dialogue.progress`: `Step`s to an `on_progress`
callback), and the terminal draws them as rich bars on stderr only when it is a terminal. Each
long step is run for real here: a model load in its own process, a TIES merge, a PEFT -> GGUF
conversion, a base's first shape scan, a notebook import through the service."""
from __future__ import annotations

import io
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from rich.console import Console

from dialogue.cli.progress import Bars
from dialogue.gguf import lora as G
from dialogue.gguf.models import bundled_model_path
from dialogue.local import adapters as A
from dialogue.local import merge as M
from dialogue.progress import Step, Steps
from loras import random_factors


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    return tmp_path


def by_task(steps: list[Step]) -> dict[str, list[Step]]:
    out: dict[str, list[Step]] = {}
    for s in steps:
        out.setdefault(s.task, []).append(s)
    return out


def test_steps_start_throttle_and_finish():
    got: list[Step] = []
    s = Steps(got.append, "merging adapters", total=1000, unit="tensors", every_s=60)
    for _ in range(1000):
        s.advance()
    s.finish()
    # the start, the last advance (always sent), the finish: not a thousand redraws
    assert [(x.done, x.finished) for x in got] == [(0, False), (1000, False), (1000, True)]
    assert got[0].describe() == "merging adapters: 0 / 1,000 tensors"
    assert got[-1].describe() == "merging adapters: done" and got[-1].fraction == 1.0
    assert Step("loading", 45, 100, "%").describe() == "loading: 45%"
    assert Step("reading the shapes").describe() == "reading the shapes…"
    assert Step.from_dict(got[1].to_dict()) == got[1]
    Steps(None, "nothing listens").finish()  # no callback: nothing to do, nothing fails


def test_a_ties_merge_reports_every_tensor_and_the_write(home):
    p1 = random_factors(1, 4, layers=range(3))
    p2 = random_factors(2, 4, layers=range(3))
    f1 = G.write_lora(home / "p1.gguf", "llama", p1)
    f2 = G.write_lora(home / "p2.gguf", "llama", p2)
    got: list[Step] = []
    M.merge_files([f1, f2], [0.5, 0.5], home / "m.gguf", method="ties", on_progress=got.append)
    tasks = by_task(got)
    merging = tasks["merging adapters (ties)"]
    assert merging[0].done == 0 and merging[0].total == 6  # 3 layers x (q, v)
    assert merging[-1].finished and merging[-1].done == 6
    assert tasks["writing m.gguf"][-1].finished
    assert (home / "m.gguf").is_file()


def test_peft_conversion_reports_its_stages(home):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    pre = "base_model.model.model.layers.{}.self_attn.q_proj"
    t = {}
    for i in range(4):
        t[f"{pre.format(i)}.lora_A.weight"] = rng.normal(size=(2, 576)).astype(np.float32)
        t[f"{pre.format(i)}.lora_B.weight"] = rng.normal(size=(576, 2)).astype(np.float32)
    d = home / "peft"
    d.mkdir()
    save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    got: list[Step] = []
    G.peft_to_gguf(d, home / "c.gguf", bundled_model_path(), on_progress=got.append)
    order = list(by_task(got))
    assert order == ["reading adapter_model.safetensors", f"reading the base {bundled_model_path().name}",
                     "converting LoRA factors", "writing c.gguf"]
    conv = by_task(got)["converting LoRA factors"]
    assert conv[0].total == 4 and conv[-1].finished
    assert all(s[-1].finished for s in by_task(got).values())


def test_adding_an_adapter_reports_the_bases_first_shape_scan_only_once(home, monkeypatch):
    monkeypatch.setattr(A, "_base_cache", {})  # as a fresh process would be
    f = G.write_lora(home / "a.gguf", "llama", random_factors(3, 2, layers=[0]))
    got: list[Step] = []
    A.add(f, "a", on_progress=got.append)
    scan = [s for s in got if s.task.startswith("reading the tensor shapes of")]
    assert [s.finished for s in scan] == [False, True] and scan[0].total is None
    again: list[Step] = []
    A.add(f, "b", on_progress=again.append)  # the shapes are known now: nothing long to report
    assert again == []


def test_a_notebook_import_reports_reading_cells_and_the_store(tmp_path):
    from dialogue.artifacts import read_notebook
    from dialogue.service import DialogueService
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = {i}") for i in range(250)])
    path = tmp_path / "big.ipynb"
    path.write_text(nbformat.writes(nb))
    got: list[Step] = []
    doc = read_notebook(path, on_progress=got.append)
    svc = DialogueService(tmp_path / "d.db")
    try:
        d = svc.import_dialogue(doc, on_progress=got.append)
    finally:
        svc.close()
    assert len(d.messages) == 250
    tasks = by_task(got)
    assert list(tasks) == ["reading the notebook", "checking the notebook", "converting cells",
                           "storing 250 messages"]
    cells = tasks["converting cells"]
    assert cells[0].total == 250 and cells[-1].finished and cells[-1].done == 250
    assert all(s[-1].finished for s in tasks.values())


def test_loading_the_model_reports_llama_cpps_progress_from_its_process(monkeypatch):
    import functools

    from dialogue.gguf.models import resolve
    from dialogue.local import process
    # the bundled model loads in about 0.3 s: unthrottled, so that the steps in between show
    monkeypatch.setattr(process, "Steps", functools.partial(Steps, every_s=0))
    mp = process.ModelProcess(resolve("default"))
    got: list[Step] = []
    try:
        mp.start(got.append)
        assert mp.alive
        pcts = [s.done for s in got if not s.finished]
        assert pcts[0] == 0 and pcts == sorted(pcts) and max(pcts) == 100
        assert len(set(pcts)) > 10  # llama.cpp's progress in whole percents, not just the two ends
        assert got[-1].finished and got[-1].task == "loading the model smollm2"
        again: list[Step] = []
        mp.start(again.append)  # already loaded: nothing to report
        assert again == []
    finally:
        mp.close()


def test_terminal_bars_only_on_a_terminal():
    steps = [Step("merging adapters (ties)", 0, 4, "tensors"), Step("merging adapters (ties)", 2, 4, "tensors"),
             Step("merging adapters (ties)", 4, 4, "tensors", finished=True), Step("reading [b]x[/b].gguf")]
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    with Bars(Console(file=tty, force_terminal=True, width=100)) as bars:
        for s in steps:
            bars(s)
    drawn = tty.getvalue()
    assert "merging adapters (ties)" in drawn and "100%" in drawn
    assert "reading [b]x[/b].gguf" in drawn  # a file name is shown as written, never as markup
    piped = io.StringIO()
    with Bars(Console(file=piped, force_terminal=False)) as bars:
        for s in steps:
            bars(s)
    assert piped.getvalue() == "" and bars.steps == steps  # heard, not drawn
    # FORCE_COLOR (rich then takes a pipe for a terminal) colours a log but draws no bars in it
    forced = io.StringIO()
    with Bars(Console(file=forced, force_terminal=True)) as bars:
        for s in steps:
            bars(s)
    assert forced.getvalue() == ""
    # a command that has no long step draws nothing at all, not even a hidden cursor
    idle = Terminal()
    with Bars(Console(file=idle, force_terminal=True)):
        pass
    assert idle.getvalue() == ""


def test_the_cli_draws_bars_on_a_terminal_and_nothing_in_a_pipe(tmp_path):
    """`dialogue ask` on the bundled model loads it in a fresh process: on a terminal stderr shows
    the load as a bar, stdout stays the answer; `dialogue import` shows the cells converted.
    Piped, neither prints a bar."""
    from dialogue.service import DialogueService
    from test_cli_progress import cli
    db = tmp_path / "cli.db"
    svc = DialogueService(db)
    svc.create("d", model="local:default")
    svc.update("d", meta={"max_tokens": 2})
    svc.close()
    rc, out, err = cli(db, "ask", "d", "Hi", stderr_tty=True)
    assert rc == 0, err
    assert "loading the model smollm2" in err and "100%" in err
    assert "loading the model" not in out
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = {i}") for i in range(300)])
    path = tmp_path / "n.ipynb"
    path.write_text(nbformat.writes(nb))
    rc, out, err = cli(db, "import", str(path), stderr_tty=True)
    assert rc == 0 and "converting cells" in err and "storing 300 messages" in err
    rc, out, err = cli(db, "import", str(path), "--name", "again")
    assert rc == 0 and "converting cells" not in err and "imported 300 messages" in out


async def test_a_first_prompt_reports_the_models_load_before_its_answer(tmp_path, monkeypatch):
    """The local provider's first prompt loads the model: the stream says how far (a Progress
    with the task, as the web cell and the terminal show it), then reads and answers."""
    from dialogue.llm.base import Progress, Request, TextDelta, Turn, get_provider
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    prov = get_provider("local:default")
    # a context size no other test uses: a process of its own, not started yet
    req = Request(model="local:default", max_tokens=2, meta={"n_ctx": 1536, "kv_cache": False},
                  messages=[Turn("user", "Hi")])
    try:
        events = [e async for e in prov.stream(req)]
    finally:
        prov.runtime.close()
    loads = [e for e in events if isinstance(e, Progress) and e.task]
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert loads and all(events.index(p) < first_text for p in loads)
    assert loads[0].read == 0 and loads[-1].read == 100 and loads[-1].total == 100
    assert loads[0].describe() == "loading the model smollm2: 0%"
    assert loads[-1].describe() == "loading the model smollm2: 100%"
