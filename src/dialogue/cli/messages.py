"""One dialogue's messages: show, add, edit, mv, history; and how a message looks on a terminal."""
from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Group
from rich.markdown import Markdown
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from ..document import FLAGS, Kind, Message, output_text
from ..service import DialogueService, describe_call, mode_of
from ..terminal import markup, plain, visible
from .common import UserError, err, out, text_arg, when


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
        waiting = {p.get("id") for p in m.meta.get("pending") or [] if isinstance(p, dict)}
        for c in m.tool_calls:  # one line each: the call and what went back to the model
            res = ("waiting for approval" if c.get("id") in waiting
                   else str(c.get("result") if c.get("result") is not None else "(no result)"))
            res = res.splitlines()[0][:200] if res.strip() else res
            parts.append(plain(f"tool {describe_call(c)} -> {res}",
                               style="red" if c.get("error") else "dim"))
        if m.response:
            parts.append(Markdown(visible(m.response)))
    elif m.kind == Kind.raw:
        parts.append(plain(m.source))
    else:
        parts.append(Markdown(visible(m.source) or " "))
    for name, mime, size in DialogueService.images_of(m):  # a note's or prompt's images
        parts.append(plain(f"image {name} ({mime}, {size:,} bytes)", style="dim"))
    if line := _status_line(m):
        parts.append(plain(line, style="yellow"))
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


def cmd_show(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.open(a.name)
    folder = svc.folder(d.folder).path if d.folder else ""
    if a.json:
        print(json.dumps({**d.settings(), "id": d.id, "version": d.version, "folder_path": folder,
                          "messages": [m.to_dict() for m in d.messages]}))
        return
    out.print(f"[b]{markup(d.name)}[/b] [dim]{markup(d.id)} v{d.version}[/dim] · model "
              f"{markup(d.model)}")
    if folder:
        notes = svc.folder_context(d)
        out.print(plain(f"folder: {folder}" + (f" ({len(notes)} folder note{'s' * (len(notes) != 1)}"
                                               " sent first)" if notes else "")))
    mode, _ = mode_of(d.meta)
    if mode != "standard":
        out.print(plain(f"mode: {mode} (`dialogue mode {d.name}` shows its text)"))
    if d.meta.get("adapters"):
        from .adapters import set_text
        out.print(plain("adapters: " + set_text(d.meta["adapters"])))
    if d.system:
        out.print(Panel(plain(d.system), title="system", title_align="left", border_style="dim"))
    for c in d.context:
        out.print(f"[dim]attached:[/dim] {markup(c.name)} ({len(c.content):,} characters)")
    for i, m in enumerate(d.messages, 1):
        out.print(render_message(m, i))
    if not d.messages:
        out.print("[dim](no messages: `dialogue add NAME --code ...`)[/dim]")


def cmd_add(svc: DialogueService, a: argparse.Namespace) -> int:
    kind, text = next((k, getattr(a, k)) for k in ("code", "note", "prompt") if getattr(a, k) is not None)
    flags = {f: True for f in FLAGS if getattr(a, f, False)}
    m = svc.add(a.name, kind, text_arg(text), after=a.after, before=a.before,
                index=None if a.at is None else a.at - 1, images=a.image or (), **flags)
    err.print(f"added {m.kind.value} message {m.id}")
    if a.run and m.kind in (Kind.code, Kind.prompt):
        import asyncio
        from .runs import stream_run
        return asyncio.run(stream_run(svc, a.name, m.id, yes=a.yes, tools=not a.no_tools))
    return 0


def cmd_edit(svc: DialogueService, a: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if a.source is not None:
        changes["source"] = text_arg(a.source)
    if a.response is not None:
        changes["response"] = text_arg(a.response)
    if a.kind is not None:
        changes["kind"] = a.kind
    for f in FLAGS:
        v = getattr(a, f)
        if v is not None:
            changes[f] = v
    if not changes and not a.image:
        raise UserError("nothing to change: give --source, --response, --kind, --image or a flag "
                        "option")
    base = a.base_version
    if changes:  # a new source drops the images it no longer shows, as the web editor does
        m = svc.edit(a.name, a.msg, base_version=base, prune_attachments=True, **changes)
        base = m.version
    if a.image:  # then each image goes in, referenced on a line after the text
        m, _ = svc.add_images(a.name, a.msg, a.image, base_version=base)
    out.print(plain(f"message {m.id} is now at version {m.version}"))


def cmd_mv(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.up:
        m = svc.move(a.name, a.msg, by=-a.up)
    elif a.down:
        m = svc.move(a.name, a.msg, by=a.down)
    else:
        m = svc.move(a.name, a.msg, to=a.to - 1)
    pos = [x.id for x in svc.messages(a.name)].index(m.id) + 1
    out.print(plain(f"message {m.id} is now at position {pos}"))


def cmd_history(svc: DialogueService, a: argparse.Namespace) -> None:
    vs = svc.history(a.name, a.msg)
    if a.json:
        print(json.dumps([v.__dict__ for v in vs]))
        return
    if not a.versions:
        _print_steps(svc.history_steps(a.name, a.msg), a.name, a.msg)
    else:
        t = Table("version", "op", "by", "when", "kind", "flags", "source", box=None)
        for v in vs:
            s = v.state
            first = (s["source"].strip().splitlines() or [""])[0]
            t.add_row(str(v.version), plain(v.op), plain(svc.who(v)), when(v.at),
                      plain(s["kind"]), " ".join(f for f in FLAGS if s.get(f)), plain(first[:60]))
        out.print(t)
    if note := svc.history_note(vs):
        out.print(plain(note, style="dim"))


def _print_steps(steps: list[Any], name: str, msg: str) -> None:
    """Each step (an edit with its run: `history.Step`): its versions, when, what happened, the
    diff of its source against the step before (the whole source for the first), and the first
    line of what it produced."""
    for st in steps:
        flags = " ".join(f for f in FLAGS if st.state.get(f))
        head = plain(f"step {st.number}", style="bold")
        head.append(f"  {st.versions_text()}  {when(st.at)}  {st.kind}  ", style="dim")
        head.append_text(plain(st.summary()))
        if flags:
            head.append(f"  {flags}", style="yellow")
        out.print(head)
        if st.number == 1:
            for line in st.source.splitlines() or [""]:
                out.print(plain("  " + line))
        for line in st.diff.splitlines():
            style = ("bold" if line.startswith(("---", "+++")) else "cyan" if line.startswith("@@")
                     else "green" if line.startswith("+") else "red" if line.startswith("-")
                     else "")
            out.print(plain("  " + line, style=style))
        if st.number > 1 and not st.diff:
            out.print(plain("  (same source)", style="dim"))
        result = (st.state.get("response") or
                  output_text(st.state.get("outputs") or [])) if st.ran else ""
        if result.strip():
            first = result.strip().splitlines()[0]
            out.print(plain(f"  → {first[:100]}", style="dim"))
    if steps:
        out.print(plain(f"restore one: `dialogue restore {name} {msg} V` (its source, with its "
                        "own outputs); every version: --versions", style="dim"))


def _flag_options(p: argparse.ArgumentParser) -> None:
    for f, on, off in (("hidden", "--hide", "--unhide"), ("pinned", "--pin", "--unpin"),
                       ("collapsed", "--collapse", "--expand"),
                       ("exported", "--export", "--unexport")):
        g = p.add_mutually_exclusive_group()
        g.add_argument(on, dest=f, action="store_true", default=None, help=f"set {f}")
        g.add_argument(off, dest=f, action="store_false", default=None, help=f"clear {f}")


def _args_show(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")


def _args_add(sp: argparse.ArgumentParser) -> None:
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
    from .runs import tool_options
    tool_options(sp)
    sp.add_argument("--image", action="append", metavar="PATH",
                    help="a note's or prompt's image (PNG, JPEG, GIF or WebP, at most 5 MiB); "
                         "repeat for more")


def _args_edit(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--source", metavar="TEXT")
    sp.add_argument("--response", metavar="TEXT", help="replace a prompt's answer")
    sp.add_argument("--kind", choices=[k.value for k in Kind])
    sp.add_argument("--image", action="append", metavar="PATH",
                    help="add an image to a note or prompt (PNG, JPEG, GIF or WebP, at most 5 MiB); "
                         "repeat for more")
    sp.add_argument("--base-version", type=int, help="refuse the edit unless the message is still "
                    "at this version")
    _flag_options(sp)


def _args_mv(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--up", type=int, nargs="?", const=1, metavar="N")
    g.add_argument("--down", type=int, nargs="?", const=1, metavar="N")
    g.add_argument("--to", type=int, metavar="POS", help="1-based position")


def _args_history(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--versions", action="store_true",
                    help="every stored version, one a line (default: steps, each edit with its "
                         "run, and the diff from the step before)")
    sp.add_argument("--json", action="store_true")


COMMANDS = {
    "show": (cmd_show, "show a dialogue in the terminal", _args_show),
    "add": (cmd_add, "add a message (TEXT '-' reads standard input)", _args_add),
    "edit": (cmd_edit, "change a message (MSG: id, id prefix or 1-based position)", _args_edit),
    "mv": (cmd_mv, "move a message", _args_mv),
    "history": (cmd_history, "the history of a message: its steps, each with a diff",
                _args_history),
}
