"""Running messages from the terminal: ask, exec, run (and `add --run`), the answer or the output
streamed to stdout as it arrives, a model's progress reading a long prompt on stderr."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..document import Kind, Message, output_text
from ..service import (ApprovalError, DialogueService, Progress, ProviderError, decision_of,
                       describe_call)
from ..terminal import StreamWriter, markup, plain, visible
from .common import EXIT_ERROR, emit_json, err, text_arg


def cmd_ask(svc: DialogueService, a: argparse.Namespace) -> int:
    """Add a prompt and stream the model's answer to the terminal."""
    m = svc.add(a.name, Kind.prompt, text_arg(a.text), images=a.image or ())
    return asyncio.run(stream_run(svc, a.name, m.id, prefill=a.prefill, as_json=a.json,
                                  yes=a.yes, tools=not a.no_tools))


def cmd_exec(svc: DialogueService, a: argparse.Namespace) -> int:
    """Run an existing code message or prompt."""
    return asyncio.run(stream_run(svc, a.name, svc.message_id(a.name, a.msg), prefill=a.prefill,
                                  as_json=a.json, yes=a.yes, tools=not a.no_tools))


def run_record(svc: DialogueService, m: Message) -> dict[str, Any]:
    """What `--json` reports of a message that ran: how it ended and what it produced."""
    run = m.meta.get("run", {})
    return {"id": m.id, "kind": m.kind.value, "status": svc.run_status(m), "source": m.source,
            "response": m.response, "outputs": m.outputs, "text": output_text(m.outputs),
            "execution_count": m.execution_count, "tool_calls": m.tool_calls, "usage": m.usage,
            "error": m.meta.get("error") or run.get("message") or None}


def terminal_input(pause: Any = None, echoes: list[str] | None = None) -> Any:
    """How a cell's input() is answered from here: on a terminal, an answerer that asks on it
    (getpass for a password: nothing is echoed), pausing `pause` (a live progress display)
    meanwhile, and noting in `echoes` the line the cell's output will repeat; False when
    standard input is not a terminal, so input() in a cell fails at once instead of waiting."""
    if not sys.stdin.isatty():
        return False
    import getpass

    async def answer(prompt: str, password: bool) -> str:
        shown = visible(prompt)
        if pause is not None:
            pause.stop()
        try:
            text = await asyncio.to_thread(getpass.getpass if password else input, shown)
        finally:
            if pause is not None:
                pause.start()
        if echoes is not None:  # the output shows what the terminal just did: once is enough
            echoes.append(prompt + ("" if password else text) + "\n")
        return text
    return answer


def terminal_approval(yes: bool, pause: Any = None) -> Any:
    """How the model's tool calls that need approval are answered from here (see
    DialogueService.start's `approve`): `--yes` allows them all; on a terminal, a question for
    each (y: allow once, a: always allow this tool in this dialogue, n: deny), pausing `pause`
    (a live progress display) meanwhile; otherwise False: denied, and `approval_note` says so."""
    if yes:
        return True
    if not sys.stdin.isatty():
        return False

    def ask(info: dict[str, Any]) -> str:  # run in a thread by the service
        if pause is not None:
            pause.stop()
        try:
            err.print(plain("\nThe model wants to call " + describe_call(info)), soft_wrap=True)
            preview = info.get("preview") or {}
            if preview.get("text"):
                err.print(plain(str(preview["text"]), style="dim"))
            while True:
                try:
                    got = input("Allow? [y]es once, [a]lways in this dialogue, [n]o: ")
                except (EOFError, KeyboardInterrupt):
                    return "deny"
                try:
                    return decision_of(got)  # y/yes, a/always, n/no (the service's words)
                except ApprovalError:
                    continue  # anything else: asked again
        finally:
            if pause is not None:
                pause.start()
    return ask


def approval_note(data: dict[str, Any]) -> str | None:
    """The line on stderr for a tool call denied because nobody was there to approve it."""
    if data.get("decision") == "deny" and data.get("reason") == "unattended":
        return (f"tool call {describe_call(data)} needs approval and standard input is not a "
                "terminal: denied (--yes allows tool calls, --no-tools offers none)")
    return None


def _progress(data: dict[str, Any]) -> Progress:
    return Progress(int(data.get("read") or 0), int(data.get("total") or 0), data.get("eta_s"),
                    str(data.get("task") or ""))


class ReadingLine:
    """A model's progress reading a long prompt, on stderr (stdout holds only the answer, so
    `dialogue ask ... > answer.md` stays clean). On a terminal: one line rewritten with \\r and
    erased before anything else is printed. Otherwise (a log, a pipe): a plain line when reading
    starts and at each quarter, so at most five; none for a prompt read in one go."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.shown = False  # a \r line is on the terminal
        self.next_mark = 0.0  # the fraction read at which the next plain line is due

    def update(self, data: dict[str, Any]) -> None:
        p = _progress(data)
        if p.total <= 0:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + p.describe())
            self.stream.flush()
            self.shown = True
            return
        done = min(1.0, p.read / p.total)
        if self.next_mark == 0.0 and done >= 1.0:
            return  # nothing was waited for
        if done >= self.next_mark:
            self.stream.write(p.describe() + "\n")
            self.stream.flush()
            self.next_mark = (int(done * 4) + 1) / 4

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


async def stream_run(svc: DialogueService, name: str, mid: str, prefill: str | None = None,
                     as_json: bool = False, yes: bool = False, tools: bool = True) -> int:
    """Run a message, printing what it produces as it arrives (`as_json`: one JSON document
    at the end instead, `run_record`); exit status 1 if it failed. Tool calls: `yes` allows
    them all, `tools=False` offers none, else `terminal_approval` asks."""
    reading = ReadingLine()
    # what the model or the code writes reaches the terminal made visible, piece by piece
    stream = StreamWriter()
    write = (lambda _: None) if as_json else stream.write
    try:
        if svc.message(name, mid).kind == Kind.prompt:
            from .progress import Bars
            with Bars() as bars:  # a local model not loaded yet: show the load, not a blank wait
                try:
                    await asyncio.to_thread(svc.load_model, name, bars)
                except ProviderError:
                    pass  # the run meets it again and stores and prints it as an answer's error
        echoes: list[str] = []
        svc.start(name, mid, prefill=prefill, stdin=terminal_input(echoes=echoes),
                  approve=terminal_approval(yes), tools=tools)
        if prefill:
            write(prefill)
        final = None
        async for ev in svc.subscribe(mid):
            if ev.type == "progress":
                reading.update(ev.data)
                continue
            reading.clear()
            if ev.type == "text":
                write(ev.data)
            elif ev.type == "output":
                text = output_text([ev.data]) if ev.data.get("output_type") != "stream" else ev.data.get("text", "")
                if echoes and text == echoes[0]:  # the answered line, already on the terminal
                    echoes.pop(0)
                    continue
                if text:
                    write(text if text.endswith("\n") else text + "\n")
            elif ev.type == "tool_call":
                call = f"tool call: {ev.data['name']}({json.dumps(ev.data['arguments'])})"
                err.print(plain(call, style="dim"))
            elif ev.type == "approval" and (note := approval_note(ev.data)):
                err.print(plain(note), soft_wrap=True)
            elif ev.type == "error":
                err.print(plain(f"error: {ev.data}"), soft_wrap=True)  # one line, however long
            elif ev.type == "done":
                final = ev.data
        reading.clear()
        stream.close()
        final = final or svc.message(name, mid)
        u = final.usage
        failed = final.meta.get("error") and not (u.get("input") or u.get("output"))
        if as_json:
            emit_json(run_record(svc, final))
        elif final.kind == Kind.prompt and not failed:  # a failed answer's one line is its error
            sys.stdout.write("\n")
            # None: a model with no known price (an openai-compatible server, a model newer
            # than the price database); 0: a local model, nothing to say
            cost = (", cost unknown" if "cost" in u and u["cost"] is None
                    else f", ${u['cost']:.4f}" if u.get("cost") else "")
            cut = final.meta.get("cut") or []
            cut = f"; long output of {len(cut)} code message(s) shortened" if cut else ""
            err.print(f"[dim]{markup(u.get('model', ''))}: {u.get('input', 0)} in "
                      f"({u.get('cache_read', 0)} from cache), {u.get('output', 0)} out{cost}{cut}[/dim]")
        return 0 if svc.run_status(final) == "ok" else EXIT_ERROR
    finally:
        await svc.aclose()


def cmd_run(svc: DialogueService, a: argparse.Namespace) -> int:
    """Headless run of a stored dialogue, or of a notebook file (in a scratch database, so the
    user's own is not touched), top to bottom."""
    from pathlib import Path
    from .io import import_warnings
    if a.model:
        svc.check_model(a.model)  # before a notebook is read or a scratch database made
    target = Path(a.target)
    is_file = a.target.endswith(".ipynb") or (target.exists() and target.is_file())
    if is_file:
        import tempfile
        from ..artifacts import read_notebook, to_ipynb_bytes
        from .progress import Bars
        tmp = tempfile.TemporaryDirectory(prefix="dialogue-run-")
        with Bars() as bars:
            doc = read_notebook(target, keep_ids=True, on_progress=bars)
            svc.close()
            svc = DialogueService(Path(tmp.name) / "run.db")
            d = svc.import_dialogue(doc, trust=a.trust, on_progress=bars)
        import_warnings(svc, d, "run", a.target)
    else:
        d = svc.open(a.target)
    if a.model:
        svc.update(d.id, model=a.model)
    if a.timeout:
        svc.run_timeout = a.timeout
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn
    progress = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=False)
    # TextColumn renders descriptions as markup: user text goes in escaped
    task = progress.add_task(f"running {markup(d.name)}", total=None)
    ran: list[dict[str, Any]] = []  # for --json
    # one numbering everywhere: a message's 1-based position among all the dialogue's messages
    # (notes included), as `dialogue show` numbers them and as every MSG argument reads them
    place = {m.id: k for k, m in enumerate(d.messages, 1)}

    def on_start(i: int, n: int, m: Message) -> None:
        first = (m.source.strip().splitlines() or [""])[0][:40]
        desc = f"message {place.get(m.id, '?')} ({m.kind.value}): {markup(first)}"
        progress.update(task, total=n, completed=i, description=desc)
        if m.kind == Kind.prompt:
            # run_through starts the run right after this returns; a run's events are kept from
            # its first, so this task hears all of them however late it starts
            asyncio.get_running_loop().create_task(reading(m.id, desc))

    async def reading(mid: str, desc: str) -> None:
        """While the model reads a long prompt, say how far it is in the progress line; say each
        tool call denied for want of someone to approve it."""
        from contextlib import aclosing
        reading_shown = False
        async with aclosing(svc.subscribe(mid)) as evs:
            async for ev in evs:
                if ev.type == "progress":
                    progress.update(task, description=f"{desc} · {_progress(ev.data).describe()}")
                    reading_shown = True
                elif ev.type in ("text", "done") and reading_shown:
                    progress.update(task, description=desc)
                    reading_shown = False
                elif ev.type == "approval" and (note := approval_note(ev.data)):
                    progress.console.print(plain(note), soft_wrap=True)

    def on_done(i: int, n: int, m: Message) -> None:
        progress.update(task, completed=i + 1)
        ran.append(run_record(svc, m))
        status = svc.run_status(m)
        if status != "ok":
            why = m.meta.get("error") or m.meta.get("run", {}).get("message") or status
            if "StdinNotImplementedError" in why:
                why += " (input() in a cell is answered on a terminal; standard input is not one)"
            progress.console.print(f"[red]message {place.get(m.id, '?')} ({markup(m.id)}) "
                                   f"failed:[/red] "
                                   f"{markup(why)}", markup=True)

    async def go() -> list[Message]:
        try:
            return await svc.run_through(d.id, allow_errors=a.allow_errors, on_start=on_start,
                                         on_done=on_done, stdin=terminal_input(progress),
                                         approve=terminal_approval(a.yes, progress),
                                         tools=not a.no_tools)
        finally:
            await svc.shutdown_kernels()

    with progress:
        failures = asyncio.run(go())
    written = None
    if is_file:
        out_path = Path(a.output) if a.output else target.with_name(target.stem + ".executed.ipynb")
        out_path.write_bytes(to_ipynb_bytes(svc.for_notebook(
            svc.as_stated(svc.open(d.id), keep_model=bool(a.model)))))
        err.print(plain(f"wrote {out_path}"))
        written = str(out_path)
        svc.close()
        tmp.cleanup()
    if a.json:
        emit_json({"dialogue": d.name, "id": d.id, "messages": ran, "failed": len(failures),
                   "written": written})
    if failures:
        err.print(f"{len(failures)} message(s) failed")
        # like `nbconvert --execute --allow-errors`: errors recorded in the outputs are the
        # expected result then, not a failure of the run
        return 0 if a.allow_errors else EXIT_ERROR
    return 0


def tool_options(sp: argparse.ArgumentParser) -> None:
    """--yes / --no-tools: how the model's tool calls are approved (see terminal_approval)."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--yes", action="store_true",
                   help="allow every tool call the model makes without asking")
    g.add_argument("--no-tools", action="store_true", help="offer the model no tools")


def _args_ask(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("text", help="the prompt ('-' reads standard input)")
    sp.add_argument("--prefill", help="the start of the answer, for the model to continue")
    sp.add_argument("--image", action="append", metavar="PATH",
                    help="an image file (PNG, JPEG, GIF or WebP, at most 5 MiB) to attach; repeat for more")
    sp.add_argument("--json", action="store_true", help="print one JSON document at the end (the stored answer)")
    tool_options(sp)


def _args_exec(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--prefill")
    sp.add_argument("--json", action="store_true", help="print one JSON document at the end (what the run stored)")
    tool_options(sp)


def _args_run(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("target", metavar="FILE.ipynb|NAME")
    sp.add_argument("--model", help="answer prompts with this model")
    sp.add_argument("-o", "--output", help="where to write the executed notebook (files only)")
    sp.add_argument("--allow-errors", action="store_true", help="go on after a failure")
    sp.add_argument("--timeout", type=float, help="seconds per code message")
    sp.add_argument("--json", action="store_true", help="print one JSON document at the end: each message run and how it ended")
    sp.add_argument("--trust", action="store_true",
                    help="adopt the notebook's system prompt (a file's model is used only if you "
                         "configured it)")
    tool_options(sp)


COMMANDS = {
    "ask": (cmd_ask, "add a prompt and stream the model's answer", _args_ask),
    "exec": (cmd_exec, "run a code message or prompt of a dialogue", _args_exec),
    "run": (cmd_run, "run a dialogue or notebook top to bottom (headless)", _args_run),
}
