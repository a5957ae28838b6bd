"""`dialogue ...`: the command line. Every command calls the dialogue service; user mistakes (an
unknown dialogue, a bad id, a conflict) print one line to stderr and exit non-zero, never a
traceback. Every string a user, a notebook or a model wrote is printed through
`dialogue.terminal` (control characters visible, never parsed as rich markup)."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from typing import Any, Callable

from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from .document import FLAGS, Kind, Message, output_text
from .service import DialogueService
from .llm.base import ProviderError
from .store import HIT_END, HIT_START, ConflictError, NameTakenError, StoreError
from .terminal import StreamWriter, markup, plain, visible

EXIT_ERROR, EXIT_CONFLICT = 1, 3

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 1."""


# ---------------------------------------------------------------- rendering

def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""


def _flags(m: Message) -> str:
    return " ".join(f for f in FLAGS if getattr(m, f))


def render_message(m: Message, index: int | None = None) -> Panel:
    """A message as a rich panel: code highlighted with its outputs, notes and answers as
    markdown (rich renders markdown as terminal text, so no markup from a model reaches a
    browser here)."""
    parts: list[Any] = []
    if m.kind == Kind.code:
        parts.append(Syntax(visible(m.source) or " ", "python", theme="ansi_dark", word_wrap=True))
        if m.outputs:
            text = m.output_text()
            errored = any(o.get("output_type") == "error" for o in m.outputs)
            parts.append(plain(text or "[non-text output]", style="red" if errored else "dim"))
    elif m.kind == Kind.prompt:
        parts.append(plain(m.source, style="bold"))
        if m.response:
            parts.append(Markdown(visible(m.response)))
    elif m.kind == Kind.raw:
        parts.append(plain(m.source))
    else:
        parts.append(Markdown(visible(m.source) or " "))
    if line := _status_line(m):
        parts.append(plain(line, style="yellow"))
    from rich.console import Group
    title = f"[b]{index}[/b] " if index is not None else ""
    title += f"{m.kind.value} [dim]{markup(m.id)} v{m.version}[/dim]"
    if f := _flags(m):
        title += f" [yellow]{f}[/yellow]"
    return Panel(Group(*parts), title=title, title_align="left",
                 border_style="dim" if m.hidden else {"code": "blue", "prompt": "green"}.get(m.kind.value, "white"))


def _status_line(m: Message) -> str:
    """How the last run ended, when that is not plain from what is shown: a cell that was
    interrupted, timed out or whose process died (an error shows as its traceback), a prompt
    that failed, was stopped or was cut off."""
    if m.kind not in (Kind.code, Kind.prompt):
        return ""
    status = DialogueService.run_status(m)
    if status == "ok" or (m.kind == Kind.code and status == "error" and not m.meta.get("interrupted")):
        return ""
    if m.kind == Kind.code:
        why = m.meta.get("run", {}).get("message", "")
    else:
        why = {"error": m.meta.get("error", ""), "cancelled": "stopped before the end",
               "interrupted": "the answer was cut off: the process writing it stopped before "
                              "it finished"}.get(status, "")
    return f"{status}: {why}" if why else status


def _hit_text(snippet: str) -> Text:
    t = Text()
    on = False
    for chunk in snippet.replace(HIT_END, HIT_START).split(HIT_START):
        t.append(visible(chunk), style="bold yellow" if on else "")
        on = not on
    return t


# ---------------------------------------------------------------- commands

def cmd_new(svc: DialogueService, a: argparse.Namespace) -> None:
    from .context import with_output_limit
    meta = with_output_limit({}, a.output_limit) if a.output_limit else None  # checked first
    d = svc.create(a.name, model=a.model, system=a.system or "", meta=meta)
    out.print(f"created dialogue [b]{markup(d.name)}[/b] ({markup(d.id)}) on model {markup(d.model)}")


def cmd_list(svc: DialogueService, a: argparse.Namespace) -> None:
    rows = svc.list(deleted=a.trash)
    if a.json:
        print(json.dumps(rows))
        return
    if not rows:
        out.print("no dialogues yet: `dialogue new NAME`" if not a.trash else "the trash is empty")
        return
    t = Table("name", "id", "model", "messages", "updated", box=None)
    for r in rows:
        t.add_row(plain(r["name"]), plain(r["id"]), plain(r["model"]), str(r["messages"]),
                  _when(r["updated"]))
    out.print(t)


def cmd_show(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.open(a.name)
    if a.json:
        print(json.dumps({**d.settings(), "id": d.id, "version": d.version,
                          "messages": [m.to_dict() for m in d.messages]}))
        return
    out.print(f"[b]{markup(d.name)}[/b] [dim]{markup(d.id)} v{d.version}[/dim] · model "
              f"{markup(d.model)}")
    if d.meta.get("adapters"):
        from .local.adapters_cli import set_text
        out.print(plain("adapters: " + set_text(d.meta["adapters"])))
    if d.system:
        out.print(Panel(plain(d.system), title="system", title_align="left", border_style="dim"))
    for c in d.context:
        out.print(f"[dim]attached:[/dim] {markup(c.name)} ({len(c.content):,} characters)")
    for i, m in enumerate(d.messages, 1):
        out.print(render_message(m, i))
    if not d.messages:
        out.print("[dim](no messages: `dialogue add NAME --code ...`)[/dim]")


def _text_arg(v: str) -> str:
    return sys.stdin.read() if v == "-" else v


def cmd_add(svc: DialogueService, a: argparse.Namespace) -> int:
    kind, text = next((k, getattr(a, k)) for k in ("code", "note", "prompt") if getattr(a, k) is not None)
    flags = {f: True for f in FLAGS if getattr(a, f, False)}
    m = svc.add(a.name, kind, _text_arg(text), after=a.after, before=a.before,
                index=None if a.at is None else a.at - 1, **flags)
    err.print(f"added {m.kind.value} message {m.id}")
    if a.run and m.kind in (Kind.code, Kind.prompt):
        return asyncio.run(_stream_run(svc, a.name, m.id))
    return 0


def cmd_ask(svc: DialogueService, a: argparse.Namespace) -> int:
    """Add a prompt and stream the model's answer to the terminal."""
    m = svc.add(a.name, Kind.prompt, _text_arg(a.text))
    return asyncio.run(_stream_run(svc, a.name, m.id, prefill=a.prefill))


def cmd_exec(svc: DialogueService, a: argparse.Namespace) -> int:
    """Run an existing code message or prompt."""
    return asyncio.run(_stream_run(svc, a.name, svc.message_id(a.name, a.msg), prefill=a.prefill))


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
        from .llm.base import Progress
        p = Progress(int(data.get("read") or 0), int(data.get("total") or 0), data.get("eta_s"))
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


async def _stream_run(svc: DialogueService, name: str, mid: str, prefill: str | None = None) -> int:
    """Run a message, printing what it produces as it arrives; exit status 1 if it failed."""
    reading = ReadingLine()
    # what the model or the code writes reaches the terminal made visible, piece by piece
    stream = StreamWriter()
    try:
        svc.start(name, mid, prefill=prefill)
        if prefill:
            stream.write(prefill)
        final = None
        async for ev in svc.subscribe(mid):
            if ev.type == "progress":
                reading.update(ev.data)
                continue
            reading.clear()
            if ev.type == "text":
                stream.write(ev.data)
            elif ev.type == "output":
                text = output_text([ev.data]) if ev.data.get("output_type") != "stream" else ev.data.get("text", "")
                if text:
                    stream.write(text if text.endswith("\n") else text + "\n")
            elif ev.type == "tool_call":
                call = f"tool call: {ev.data['name']}({json.dumps(ev.data['arguments'])})"
                err.print(plain(call, style="dim"))
            elif ev.type == "error":
                err.print(plain(f"error: {ev.data}"))
            elif ev.type == "done":
                final = ev.data
        reading.clear()
        stream.close()
        final = final or svc.store.get_message(mid)
        if final.kind == Kind.prompt:
            sys.stdout.write("\n")
            u = final.usage
            cost = f", ${u['cost']:.4f}" if u.get("cost") else ""
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
    target = Path(a.target)
    is_file = a.target.endswith(".ipynb") or (target.exists() and target.is_file())
    if is_file:
        import tempfile
        from .artifacts import read_notebook, to_ipynb_bytes
        doc = read_notebook(target, keep_ids=True)
        tmp = tempfile.TemporaryDirectory(prefix="dialogue-run-")
        svc.close()
        svc = DialogueService(Path(tmp.name) / "run.db")
        d = svc.import_dialogue(doc, trust=a.trust)
        _import_warnings(d, "run", a.target)
    else:
        d = svc.open(a.target)
    if a.model:
        svc.update(d.id, model=a.model)
    if a.timeout:
        svc.run_timeout = a.timeout
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=False)
    # TextColumn renders descriptions as markup: user text goes in escaped
    task = progress.add_task(f"running {markup(d.name)}", total=None)

    def on_start(i: int, n: int, m: Message) -> None:
        first = (m.source.strip().splitlines() or [""])[0][:40]
        desc = f"{m.kind.value} {i + 1}: {markup(first)}"
        progress.update(task, total=n, completed=i, description=desc)
        if m.kind == Kind.prompt:
            # run_through starts the run right after this returns, before it awaits anything, so
            # this task subscribes before the first event
            asyncio.get_running_loop().create_task(reading(m.id, desc))

    async def reading(mid: str, desc: str) -> None:
        """While the model reads a long prompt, say how far it is in the progress line."""
        from contextlib import aclosing
        from .llm.base import Progress as Read
        async with aclosing(svc.subscribe(mid)) as evs:
            async for ev in evs:
                if ev.type == "progress":
                    p = Read(int(ev.data.get("read") or 0), int(ev.data.get("total") or 0),
                             ev.data.get("eta_s"))
                    progress.update(task, description=f"{desc} · {p.describe()}")
                elif ev.type in ("text", "done"):
                    progress.update(task, description=desc)
                    break

    def on_done(i: int, n: int, m: Message) -> None:
        progress.update(task, completed=i + 1)
        status = svc.run_status(m)
        if status != "ok":
            why = m.meta.get("error") or m.meta.get("run", {}).get("message") or status
            progress.console.print(f"[red]message {i + 1} ({markup(m.id)}) failed:[/red] "
                                   f"{markup(why)}", markup=True)

    async def go() -> list[Message]:
        try:
            return await svc.run_through(d.id, allow_errors=a.allow_errors, on_start=on_start,
                                         on_done=on_done)
        finally:
            await svc.shutdown_kernels()

    with progress:
        failures = asyncio.run(go())
    if is_file:
        out_path = Path(a.output) if a.output else target.with_name(target.stem + ".executed.ipynb")
        out_path.write_bytes(to_ipynb_bytes(_as_read(svc.open(d.id), bool(a.model))))
        err.print(plain(f"wrote {out_path}"))
        svc.close()
        tmp.cleanup()
    if failures:
        err.print(f"{len(failures)} message(s) failed")
        # like `nbconvert --execute --allow-errors`: errors recorded in the outputs are the
        # expected result then, not a failure of the run
        return 0 if a.allow_errors else EXIT_ERROR
    return 0


def _import_warnings(d: Any, command: str, file: str) -> None:
    """One line on stderr for each setting of the notebook that the import set aside
    (trust.vet_import), and how to adopt its system prompt."""
    import shlex
    from .trust import import_record
    rec = import_record(d)
    # Text: never parsed as markup; what came from the file is quoted with repr (controls escaped)
    for w in rec.get("warnings", []):
        err.print(Text(f"warning: {w}"))
    system = rec.get("system")
    if isinstance(system, str) and system:
        snippet = repr(system if len(system) <= 100 else system[:100] + "…")
        err.print(Text(f"  its system prompt: {snippet}; `dialogue {command} --trust "
                       f"{shlex.quote(file)}` adopts it"))


def _as_read(d: Any, model_given: bool) -> Any:
    """An executed notebook keeps the model and system prompt its file stated, even where the run
    did not adopt them."""
    from .trust import IMPORT_KEY, import_record
    rec = import_record(d)
    if rec:
        d.meta.pop(IMPORT_KEY, None)
        d.system = rec.get("system", d.system)
        if "model" in rec and not model_given:
            d.model = rec["model"]
    return d


def cmd_import(svc: DialogueService, a: argparse.Namespace) -> None:
    from .artifacts import read_notebook
    doc = read_notebook(a.file, keep_ids=True)
    try:
        d = svc.import_dialogue(doc, name=a.new_name, trust=a.trust)
    except NameTakenError as e:
        raise UserError(f"{e}: import it under another name with --name") from None
    out.print(f"imported {len(d.messages)} messages into dialogue [b]{markup(d.name)}[/b] "
              f"({markup(d.id)})")
    _import_warnings(d, "import", a.file)


def cmd_export(svc: DialogueService, a: argparse.Namespace) -> None:
    from pathlib import Path
    from . import artifacts
    d = svc.open(a.name)
    ext = {"ipynb": ".ipynb", "py": ".py", "md": ".md", "html": ".html"}[a.to]
    path = Path(a.output) if a.output else Path(_safe_filename(d.name) + ext)
    if a.to == "ipynb":
        path.write_bytes(artifacts.to_ipynb_bytes(d))
    elif a.to == "py":
        path.write_text(artifacts.to_module(d), encoding="utf-8")
    elif a.to == "md":
        artifacts.write_markdown(d, path, with_ai=a.with_ai)
    else:
        path.write_text(artifacts.to_html(d, with_ai=a.with_ai, remote_images=a.remote_images),
                        encoding="utf-8")
    out.print(plain(f"wrote {path}"))


def cmd_models(svc: DialogueService, a: argparse.Namespace) -> None:
    from .gguf import models
    if a.action == "add":
        if not a.target:
            raise UserError("give a .gguf path, or a Hugging Face repo id and a file name")
        if a.file:  # REPO FILE: download (needs network; only on this explicit request)
            spec = models.add_from_hub(a.target, a.file, name=a.name, chat_format=a.chat_format)
        else:
            from pathlib import Path
            spec = models.add(a.name or Path(a.target).stem, a.target, chat_format=a.chat_format)
        out.print(plain(f"added local:{spec.name} -> {spec.path}"))
        return
    if a.action == "rm":
        if not a.target:
            raise UserError("give the name of the model to remove")
        models.remove(a.target)
        out.print(plain(f"removed local:{a.target} (the file itself is left alone)"))
        return
    t = Table("model", "where", "about", box=None)
    for spec in models.list_models():
        name = f"local:{spec.name}" + (" (local:default)" if spec.source == "bundled" else "")
        t.add_row(plain(name), plain(spec.path), plain(spec.description or spec.source))
    for env, names in (("ANTHROPIC_API_KEY", "claude-* (e.g. claude-sonnet-4-6)"),
                       ("OPENAI_API_KEY", "gpt-*, o3*, o4* (e.g. gpt-4.1-mini)")):
        t.add_row(names, "API", "key set" if os.environ.get(env) else f"set {env} to use")
    t.add_row("openai-compatible:<base_url>/<model>", "any server speaking the OpenAI API", "")
    out.print(t)


def cmd_cache(svc: DialogueService, a: argparse.Namespace) -> None:
    from .local.kvcache import KVCache
    cache = KVCache()
    if a.action == "clear":
        out.print(plain(f"deleted {cache.clear()} cached prefix states from {cache.root}"))
        return
    st = cache.stats()
    out.print(plain(f"{st.root}: {st.entries} states, {st.bytes / 1e6:.1f} MB of "
                    f"{st.max_bytes / 1e6:.0f} MB"))
    for ns in st.namespaces:
        info = ns.get("info", {})
        what = info.get("model") or info.get("model_path") or ns["namespace"]
        out.print(plain(f"  {what}: {ns['entries']} states, {ns['bytes'] / 1e6:.1f} MB, "
                        f"longest prefix {ns['longest']} tokens"))


def cmd_serve(svc: DialogueService, a: argparse.Namespace) -> int:
    svc.close()
    from .web.app import serve
    serve(db=a.db, host=a.host, port=a.port, open_browser=not a.no_browser, token=a.token)
    return 0


def cmd_adapters(svc: DialogueService, a: argparse.Namespace) -> int:
    from .local.adapters_cli import adapters_main
    return adapters_main(a.args, svc)


def cmd_train(svc: DialogueService, a: argparse.Namespace) -> int:
    try:
        from .train.main import train_main
    except ImportError as e:
        raise UserError(f"training needs the train extra: pip install 'dialogue[train]' ({e})") from None

    def load(names: list[str]) -> list:
        return [svc.open(n) for n in names]
    return train_main(a.args, load_dialogues=load)


def _safe_filename(name: str) -> str:
    import re
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "dialogue"


def cmd_edit(svc: DialogueService, a: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if a.source is not None:
        changes["source"] = _text_arg(a.source)
    if a.response is not None:
        changes["response"] = _text_arg(a.response)
    if a.kind is not None:
        changes["kind"] = a.kind
    for f in FLAGS:
        v = getattr(a, f)
        if v is not None:
            changes[f] = v
    if not changes:
        raise UserError("nothing to change: give --source, --response, --kind or a flag option")
    m = svc.edit(a.name, a.msg, base_version=a.base_version, **changes)
    out.print(plain(f"message {m.id} is now at version {m.version}"))


def cmd_rm(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.msg:
        mid = svc.message_id(a.name, a.msg)
        svc.delete_message(a.name, mid)
        out.print(plain(f"message {mid} moved to the trash (`dialogue restore {a.name} {mid}`)"))
    else:
        svc.delete(a.name)
        out.print(plain(f"dialogue {a.name!r} moved to the trash (`dialogue restore {a.name}`)"))


def cmd_mv(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.up:
        m = svc.move(a.name, a.msg, by=-a.up)
    elif a.down:
        m = svc.move(a.name, a.msg, by=a.down)
    else:
        m = svc.move(a.name, a.msg, to=a.to - 1)
    pos = [x.id for x in svc.open(a.name).messages].index(m.id) + 1
    out.print(plain(f"message {m.id} is now at position {pos}"))


def cmd_history(svc: DialogueService, a: argparse.Namespace) -> None:
    vs = svc.history(a.name, a.msg)
    if a.json:
        print(json.dumps([v.__dict__ for v in vs]))
        return
    t = Table("version", "op", "when", "kind", "flags", "source", box=None)
    for v in vs:
        s = v.state
        first = (s["source"].strip().splitlines() or [""])[0]
        t.add_row(str(v.version), plain(v.op), _when(v.at), plain(s["kind"]),
                  " ".join(f for f in FLAGS if s.get(f)), plain(first[:60]))
    out.print(t)


def cmd_restore(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.msg is None:
        d = svc.restore(a.name)
        out.print(plain(f"dialogue {d.name!r} restored from the trash"))
    elif a.version is None:
        m = svc.restore_message(a.name, a.msg)
        out.print(plain(f"message {m.id} restored from the trash"))
    else:
        m = svc.restore_version(a.name, a.msg, a.version)
        out.print(plain(f"message {m.id}: version {a.version} restored as version {m.version}"))


def cmd_fork(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.fork(a.name, a.msg, name=a.new_name)
    out.print(f"forked into [b]{markup(d.name)}[/b] ({markup(d.id)}) with {len(d.messages)} messages")


def cmd_rename(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.rename(a.name, a.new_name)
    out.print(plain(f"renamed to {d.name!r}"))


def cmd_search(svc: DialogueService, a: argparse.Namespace) -> None:
    hits = svc.search(a.query, limit=a.limit, dialogue=a.within)
    if a.json:
        print(json.dumps([h.__dict__ for h in hits]))
        return
    if not hits:
        out.print("no matches")
        return
    for h in hits:
        line = plain(f"{h.dialogue_name} ", style="bold")
        line.append(visible(f"{h.message_id} {h.kind}  "), style="dim")
        line.append_text(_hit_text(h.snippet.replace("\n", " ")))
        out.print(line)


def cmd_trash(svc: DialogueService, a: argparse.Namespace) -> None:
    items = svc.trash()
    if not items:
        out.print("the trash is empty")
        return
    t = Table("type", "id", "dialogue", "what", "deleted", box=None)
    for i in items:
        t.add_row(plain(i.type), plain(i.id), plain(i.dialogue_id), plain(i.name), _when(i.deleted))
    out.print(t)


# ---------------------------------------------------------------- parser

def _flag_options(p: argparse.ArgumentParser) -> None:
    for f, on, off in (("hidden", "--hide", "--unhide"), ("pinned", "--pin", "--unpin"),
                       ("collapsed", "--collapse", "--expand"),
                       ("exported", "--export", "--unexport")):
        g = p.add_mutually_exclusive_group()
        g.add_argument(on, dest=f, action="store_true", default=None, help=f"set {f}")
        g.add_argument(off, dest=f, action="store_false", default=None, help=f"clear {f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dialogue", description="Dialogue engineering for Python.")
    p.add_argument("--db", help="database file (default: $DIALOGUE_DB or the user data dir)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = cmd("new", cmd_new, "create a dialogue")
    sp.add_argument("name")
    sp.add_argument("--model", help="model name (default: $DIALOGUE_MODEL or local:default)")
    sp.add_argument("--system", help="system prompt")
    sp.add_argument("--output-limit", metavar="HEAD,TAIL,CHARS",
                    help="how much of a long code output the model sees: first and last lines and "
                         "at most CHARS characters (default 20,10,2000; 'off' sends it all)")

    sp = cmd("list", cmd_list, "list dialogues")
    sp.add_argument("--trash", action="store_true", help="list trashed dialogues instead")
    sp.add_argument("--json", action="store_true")

    sp = cmd("show", cmd_show, "show a dialogue in the terminal")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")

    sp = cmd("add", cmd_add, "add a message (TEXT '-' reads standard input)")
    sp.add_argument("name")
    g = sp.add_mutually_exclusive_group(required=True)
    for k in ("code", "note", "prompt"):
        g.add_argument(f"--{k}", metavar="TEXT")
    w = sp.add_mutually_exclusive_group()
    w.add_argument("--after", metavar="MSG")
    w.add_argument("--before", metavar="MSG")
    w.add_argument("--at", type=int, metavar="N", help="1-based position")
    for f, opt in (("hidden", "--hide"), ("pinned", "--pin"), ("collapsed", "--collapse"),
                   ("exported", "--export")):
        sp.add_argument(opt, dest=f, action="store_true")
    sp.add_argument("--run", action="store_true", help="run the code or prompt once added")

    sp = cmd("ask", cmd_ask, "add a prompt and stream the model's answer")
    sp.add_argument("name")
    sp.add_argument("text", help="the prompt ('-' reads standard input)")
    sp.add_argument("--prefill", help="the start of the answer, for the model to continue")

    sp = cmd("exec", cmd_exec, "run a code message or prompt of a dialogue")
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--prefill")

    sp = cmd("run", cmd_run, "run a dialogue or notebook top to bottom (headless)")
    sp.add_argument("target", metavar="FILE.ipynb|NAME")
    sp.add_argument("--model", help="answer prompts with this model")
    sp.add_argument("-o", "--output", help="where to write the executed notebook (files only)")
    sp.add_argument("--allow-errors", action="store_true", help="go on after a failure")
    sp.add_argument("--timeout", type=float, help="seconds per code message")
    sp.add_argument("--trust", action="store_true",
                    help="adopt the notebook's system prompt (a file's model is used only if you "
                         "configured it)")

    sp = cmd("import", cmd_import, "import a notebook (.ipynb) as a new dialogue")
    sp.add_argument("file")
    sp.add_argument("--name", dest="new_name")
    sp.add_argument("--trust", action="store_true",
                    help="adopt the notebook's system prompt (a file's model is used only if you "
                         "configured it)")

    sp = cmd("export", cmd_export, "export a dialogue as a notebook, module, post or page")
    sp.add_argument("name")
    sp.add_argument("--to", choices=("ipynb", "py", "md", "html"), required=True)
    sp.add_argument("-o", "--output")
    sp.add_argument("--with-ai", action="store_true", help="include prompts and answers (md, html)")
    sp.add_argument("--remote-images", action="store_true",
                    help="html: load the images notes and answers link from the web when the page "
                         "is opened (by default they show as links and nothing is fetched)")

    sp = cmd("edit", cmd_edit, "change a message (MSG: id, id prefix or 1-based position)")
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--source", metavar="TEXT")
    sp.add_argument("--response", metavar="TEXT", help="replace a prompt's answer")
    sp.add_argument("--kind", choices=[k.value for k in Kind])
    sp.add_argument("--base-version", type=int, help="refuse the edit unless the message is still "
                    "at this version")
    _flag_options(sp)

    sp = cmd("rm", cmd_rm, "move a dialogue, or one of its messages, to the trash")
    sp.add_argument("name")
    sp.add_argument("msg", nargs="?")

    sp = cmd("mv", cmd_mv, "move a message")
    sp.add_argument("name")
    sp.add_argument("msg")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--up", type=int, nargs="?", const=1, metavar="N")
    g.add_argument("--down", type=int, nargs="?", const=1, metavar="N")
    g.add_argument("--to", type=int, metavar="POS", help="1-based position")

    sp = cmd("history", cmd_history, "list every version of a message")
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--json", action="store_true")

    sp = cmd("restore", cmd_restore, "restore a trashed dialogue or message, or an earlier version")
    sp.add_argument("name")
    sp.add_argument("msg", nargs="?")
    sp.add_argument("version", nargs="?", type=int)

    sp = cmd("fork", cmd_fork, "new dialogue with the messages up to and including MSG")
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--name", dest="new_name")

    sp = cmd("rename", cmd_rename, "rename a dialogue")
    sp.add_argument("name")
    sp.add_argument("new_name")

    sp = cmd("search", cmd_search, "full-text search across all dialogues")
    sp.add_argument("query")
    sp.add_argument("--in", dest="within", metavar="NAME")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")

    cmd("trash", cmd_trash, "list what is in the trash")

    sp = cmd("models", cmd_models, "list local and API models; add or remove local ones")
    sp.add_argument("action", nargs="?", choices=("list", "add", "rm"), default="list")
    sp.add_argument("target", nargs="?", metavar="PATH.gguf|REPO|NAME")
    sp.add_argument("file", nargs="?", metavar="FILE.gguf", help="file in the Hub repository")
    sp.add_argument("--name")
    sp.add_argument("--chat-format", help="llama.cpp chat format, for files without a template")

    sp = cmd("cache", cmd_cache, "show or empty the local model's prefix KV cache")
    sp.add_argument("action", nargs="?", choices=("stats", "clear"), default="stats")

    sp = cmd("serve", cmd_serve, "open the web app")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5001)
    sp.add_argument("--no-browser", action="store_true")
    sp.add_argument("--token", help="access token (generated when binding beyond localhost)")

    sp = cmd("adapters", cmd_adapters, "LoRA adapters for local models: add, list, info, rm, merge")
    sp.add_argument("args", nargs=argparse.REMAINDER)

    sp = cmd("train", cmd_train, "fine-tune a LoRA/DoRA adapter (see `dialogue train -- --help`)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


# Commands with their own argument parser: everything after the command name is theirs, so that
# `dialogue train --help` shows the trainer's options rather than ours.
_DELEGATED = {"adapters": cmd_adapters, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help"):
        i += 2 if argv[i] == "--db" else 1
    if i < len(argv) and argv[i] in _DELEGATED:
        db = argv[argv.index("--db") + 1] if "--db" in argv[:i] else None
        argv = (["--db", db] if db else []) + [argv[i], "--", *argv[i + 1:]]
    parser = build_parser()
    a = parser.parse_args(argv)
    if getattr(a, "args", None) and a.args[0] == "--":
        a.args = a.args[1:]
    try:
        svc = DialogueService(a.db or os.environ.get("DIALOGUE_DB") or None)
    except StoreError as e:  # errors are one line, however long: soft_wrap
        err.print(plain(f"error: {e}"), soft_wrap=True)
        return EXIT_ERROR
    try:
        return a.fn(svc, a) or 0
    except ConflictError as e:
        err.print(plain(f"error: {e}"), soft_wrap=True)
        return EXIT_CONFLICT
    except (StoreError, UserError, ProviderError, ValueError, OSError) as e:
        err.print(plain(f"error: {e}"), soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        svc.close()


if __name__ == "__main__":
    sys.exit(main())
