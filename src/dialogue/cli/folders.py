"""Folders and modes: `dialogue folder new|list|rename|rm|note|template|history`, `dialogue move`,
`dialogue mode`."""
from __future__ import annotations

import argparse

from rich.table import Table

from ..service import MODES, DialogueService, NotFoundError, is_edited, mode_of
from ..terminal import plain
from .common import UserError, emit_json, out, text_arg, when

_ACTIONS = ("new", "list", "rename", "rm", "note", "template", "history")


def _where(path: str) -> str:
    return f"folder {path!r}" if path else "the top level"


def cmd_folder(svc: DialogueService, a: argparse.Namespace) -> None:
    act = a.action
    if act != "list" and not a.path:
        raise UserError(f"`dialogue folder {act}` needs a folder's path (e.g. work/ml)")
    if act == "new":
        f = svc.new_folder(a.path)
        out.print(plain(f"created folder {f.path!r}"))
    elif act == "list":
        _list(svc, a)
    elif act == "rename":
        if not a.arg:
            raise UserError("`dialogue folder rename PATH NEW_PATH`: give the new path")
        old = svc.folder(a.path).path
        f = svc.rename_folder(a.path, a.arg)
        out.print(plain(f"folder {old!r} is now {f.path!r}"))
    elif act == "rm":
        f = svc.remove_folder(a.path, move_up=a.up)
        up = svc.folder(f.parent).path if f.parent else ""
        moved = f" (what it held is now in {_where(up)})" if a.up else ""
        out.print(plain(f"deleted folder {f.path!r}{moved}"))
    elif act == "note":
        if a.arg is None:
            note = svc.folder(a.path).note
            out.print(plain(note) if note else plain(f"{_where(svc.folder(a.path).path)} has no "
                                                    "note (`dialogue folder note PATH TEXT`)"))
            return
        f = svc.set_folder(a.path, note=text_arg(a.arg))
        out.print(plain(f"folder {f.path!r}: note set ({len(f.note):,} characters); every "
                        "dialogue in it and below it sees it first" if f.note.strip()
                        else f"folder {f.path!r}: note cleared"))
    elif act == "template":
        if a.arg is None:
            f = svc.folder(a.path)
            out.print(plain(f"folder {f.path!r}: template {_template_name(svc, f.template)}"))
            return
        f = svc.set_folder(a.path, template=a.arg)
        out.print(plain(f"folder {f.path!r}: new dialogues in it start from "
                        f"{_template_name(svc, f.template)}" if f.template
                        else f"folder {f.path!r}: no template"))
    elif act == "history":
        hist = svc.folder_history(a.path)
        if a.json:
            emit_json(hist)
            return
        for v in hist:
            st = v.state
            note = (st.get("note") or "").strip().splitlines()
            out.print(plain(f"v{v.version:<3} {when(v.at)}  {v.op:8s} {st.get('name')!s}  note: "
                            f"{(note[0][:60] + ('…' if len(note) > 1 or len(note[0]) > 60 else '')) if note else '-'}"
                            f"  template: {st.get('template') or '-'}"))


def _template_name(svc: DialogueService, did: str) -> str:
    if not did:
        return "none"
    try:
        return repr(svc.open(did, messages=False).name)
    except NotFoundError:
        return f"{did} (in the trash: set another)"


def _list(svc: DialogueService, a: argparse.Namespace) -> None:
    folders = svc.folders()
    if a.json:
        emit_json(folders)
        return
    if not folders:
        out.print("no folders yet: `dialogue folder new PATH`")
        return
    t = Table("folder", "dialogues", "note", "template", box=None)
    for f in folders:
        note = f.note.strip().splitlines()
        t.add_row(plain(f.path), str(f.dialogues),
                  plain(f"{len(f.note):,} characters: {note[0][:40]}" if note else "-"),
                  plain(_template_name(svc, f.template) if f.template else "-"))
    out.print(t)


def cmd_move(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.move_to(a.name, a.folder)
    path = svc.folder(d.folder).path if d.folder else ""
    out.print(plain(f"dialogue {d.name!r} is now in {_where(path)}"))


def cmd_mode(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.mode is None and a.text is None:
        d = svc.open(a.name, messages=False)
    else:
        name = a.mode or mode_of(svc.open(a.name, messages=False).meta)[0]
        d = svc.set_mode(a.name, name, None if a.text is None else text_arg(a.text))
    name, text = mode_of(d.meta)
    edited = " (edited)" if is_edited(name, text) else ""
    out.print(plain(f"dialogue {d.name!r}: mode {name}{edited}"))
    out.print(plain(f"appended to the system prompt:\n{text}" if text
                    else "nothing is added to the system prompt"))


def _args_folder(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", choices=_ACTIONS, metavar="ACTION",
                    help="new PATH | list | rename PATH NEW_PATH | rm PATH [--up] | "
                         "note PATH [TEXT|-] | template PATH [DIALOGUE|''] | history PATH")
    sp.add_argument("path", nargs="?", help="a folder's path: names joined by '/' (a/b)")
    sp.add_argument("arg", nargs="?",
                    help="rename: the new path; note: the text ('-' reads standard input, '' "
                         "clears it); template: the dialogue new ones start from ('' for none)")
    sp.add_argument("--up", action="store_true",
                    help="rm: move what the folder holds into the folder above it, then delete "
                         "it (without it, only an empty folder is deleted)")
    sp.add_argument("--json", action="store_true", help="list, history: as JSON")


def _args_move(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", help="the dialogue")
    sp.add_argument("folder", help="the folder's path ('/' for the top level)")


def _args_mode(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("mode", nargs="?", choices=tuple(MODES), metavar="MODE",
                    help=f"one of {', '.join(MODES)} (without it: show the mode and its text)")
    sp.add_argument("--text", metavar="TEXT",
                    help="your own wording of the mode's text ('-' reads standard input)")


COMMANDS = {
    "folder": (cmd_folder, "folders: new, list, rename, rm, a note every dialogue in it sees "
                           "first, a template new dialogues start from, history", _args_folder),
    "move": (cmd_move, "move a dialogue into a folder ('/' for the top level)", _args_move),
    "mode": (cmd_mode, "show or set how the model answers: " + ", ".join(MODES)
                       + " (text added to the system prompt)", _args_mode),
}
