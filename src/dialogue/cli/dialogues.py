"""Dialogues as a whole: new, list, rename, rm, trash, restore, fork, search, attach, detach."""
from __future__ import annotations

import argparse
import json

from rich.table import Table
from rich.text import Text

from ..service import HIT_END, HIT_START, DialogueService
from ..terminal import markup, plain, visible
from .common import UserError, emit_json, out, text_arg, when


def cmd_new(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.create(a.name, model=a.model, system=a.system or "", output_limit=a.output_limit or None,
                   folder=a.folder, template=not a.no_template)
    where = f" in folder {svc.folder(d.folder).path!r}" if d.folder else ""
    tpl = d.meta.get("from_template")
    start = (f", starting from template {tpl.get('name', '')!r} ({len(d.messages)} message{'s' * (len(d.messages) != 1)})"
             if isinstance(tpl, dict) else "")
    out.print(f"created dialogue [b]{markup(d.name)}[/b] ({markup(d.id)}) on model "
              f"{markup(d.model)}{markup(where)}{markup(start)}")


def cmd_list(svc: DialogueService, a: argparse.Namespace) -> None:
    rows = svc.list(deleted=a.trash)
    if a.folder is not None:  # that folder and the folders below it
        path = svc.folder(a.folder).path if svc.folder_id(a.folder) else ""
        rows = [r for r in rows if not path or r["folder_path"] == path
                or r["folder_path"].startswith(path + "/")]
    if a.json:
        print(json.dumps(rows))
        return
    folders = [] if a.trash else svc.folders()
    if not rows and not folders:
        out.print("no dialogues yet: `dialogue new NAME`" if not a.trash else "the trash is empty")
        return
    if rows:
        t = Table("name", "folder", "id", "model", "messages", "updated", box=None)
        # grouped by folder (the top level first), most recently updated first within each
        for r in sorted(rows, key=lambda r: r["folder_path"].split("/") if r["folder_path"] else []):
            t.add_row(plain(r["name"]), plain(r["folder_path"] or "-"), plain(r["id"]),
                      plain(r["model"]), str(r["messages"]), when(r["updated"]))
        out.print(t)
    if folders:
        out.print(plain("folders: " + ", ".join(f"{f.path} ({f.dialogues})" for f in folders)),
                  soft_wrap=True)


def cmd_rm(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.msg:
        mid = svc.message_id(a.name, a.msg)
        svc.delete_message(a.name, mid)
        out.print(plain(f"message {mid} moved to the trash "
                        f"(`dialogue restore {_arg(a.name)} {mid}`)"))
    else:
        svc.delete(a.name)
        out.print(plain(f"dialogue {a.name!r} moved to the trash (`dialogue restore {a.name}`)"))


def cmd_restore(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.msg is None:
        d = svc.restore(a.name)
        out.print(plain(f"dialogue {d.name!r} restored from the trash"))
    elif a.version is None:
        m = svc.restore_message(a.name, a.msg)
        pos = [x.id for x in svc.messages(a.name)].index(m.id) + 1
        out.print(plain(f"message {m.id} restored from the trash, at position {pos}"))
    else:
        m = svc.restore_version(a.name, a.msg, a.version)
        out.print(plain(f"message {m.id}: version {a.version} restored as version {m.version}"))


def cmd_fork(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.fork(a.name, a.msg, name=a.new_name)
    out.print(f"forked into [b]{markup(d.name)}[/b] ({markup(d.id)}) with {len(d.messages)} messages")


def cmd_rename(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.rename(a.name, a.new_name)
    out.print(plain(f"renamed to {d.name!r}"))


def _hit_text(snippet: str) -> Text:
    t = Text()
    on = False
    for chunk in snippet.replace(HIT_END, HIT_START).split(HIT_START):
        t.append(visible(chunk), style="bold yellow" if on else "")
        on = not on
    return t


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
    if a.json:
        emit_json(items)
        return
    if not items:
        out.print("the trash is empty")
        return
    t = Table("dialogue", "message", "what", "deleted", "restore with", box=None)
    for i in items:
        if i.type == "dialogue":
            t.add_row(plain(i.name), "", plain("the whole dialogue"), when(i.deleted),
                      plain(f"dialogue restore {_arg(i.name)}"))
        else:
            t.add_row(plain(i.dialogue_name), plain(f"{i.position} ({i.id})"), plain(i.name),
                      when(i.deleted), plain(f"dialogue restore {_arg(i.dialogue_name)} {i.id}"))
    out.print(t)


def _arg(name: str) -> str:
    """A name as a shell argument (quoted when it needs to be)."""
    import shlex
    return shlex.quote(name)


def cmd_attach(svc: DialogueService, a: argparse.Namespace) -> None:
    """Attach a file, folder, package's docs or URL; refresh items; or list them (no source)."""
    sources = [x for x in (a.path, a.package, a.url) if x]
    if len(sources) > 1:
        raise UserError("attach one thing: a PATH, --package or --url")
    if a.refresh is not None:
        if sources:
            raise UserError("--refresh reads the attached items again from their sources; it takes "
                            "no PATH, --package or --url")
        d, report = svc.refresh(a.name, a.refresh or None)
        for r in report:
            if "changed" in r:
                what = (f"changed ({r['before']:,} -> {r['after']:,} characters)" if r["changed"]
                        else "unchanged")
                out.print(plain(f"refreshed {r['name']}: {what}"))
            else:
                out.print(plain(f"not refreshed {r['name']}: {r.get('error') or r.get('skipped')}"))
        if any("error" in r for r in report):
            raise UserError(f"some attached items of dialogue {d.name!r} could not be read again")
        return
    if not sources:
        return _list_attached(svc, a)
    item_name = a.as_name
    if a.path == "-":
        if not item_name:
            raise ValueError("name what standard input is attached as: --name ITEM")
        d = svc.attach(a.name, item_name, text_arg("-"))
        item, summary = item_name.strip(), ""
    else:
        d, loaded = svc.attach_source(a.name, path=a.path, package=a.package, url=a.url,
                                      name=item_name)
        item, summary = loaded.name, loaded.summary()
    row = next(r for r in svc.context_status(d.id) if r["name"] == item)
    tokens = f"{row['tokens']:,} tokens" if row["exact"] else f"~{row['tokens']:,} tokens (estimated)"
    chars, _, rest = (summary or f"{row['chars']:,} characters").partition("; ")
    out.print(plain(f"attached {item} ({chars}, {tokens}{'; ' + rest if rest else ''}) to dialogue "
                    f"{d.name!r}: every prompt of it sees it"))


def _list_attached(svc: DialogueService, a: argparse.Namespace) -> None:
    rows = svc.context_status(a.name)
    if a.json:
        emit_json(rows)
        return
    if not rows:
        out.print(plain("nothing attached"))
        return
    t = Table("item", "kind", "tokens", "cached", "source", box=None)
    for r in rows:
        cached = {True: "yes", False: "no", None: "-"}[r["cached"]]
        t.add_row(plain(r["name"]), plain(r["kind"]),
                  plain(f"{r['tokens']:,}" if r["exact"] else f"~{r['tokens']:,}"), cached,
                  plain(r["source"]))
    out.print(t)


def cmd_detach(svc: DialogueService, a: argparse.Namespace) -> None:
    d = svc.detach(a.name, a.item)
    out.print(plain(f"detached {a.item} from dialogue {d.name!r}"))


def cmd_config(svc: DialogueService, a: argparse.Namespace) -> None:
    """Show a dialogue's settings, or change the ones given."""
    changes: dict = {}
    if a.model:
        changes["model"] = a.model
    if a.system is not None:
        changes["system"] = text_arg(a.system)
    if a.output_limit:
        changes["output_limit"] = a.output_limit
    if a.max_tokens is not None:
        changes["max_tokens"] = None if a.max_tokens == "default" else a.max_tokens
    sampling: dict = {}
    for item in a.sampling or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--sampling takes KEY=VALUE, not {item!r}")
        low = value.strip().lower()
        sampling[key.strip()] = (low in ("1", "true", "yes", "on")) if low in (
            "1", "0", "true", "false", "yes", "no", "on", "off") and key.strip() == "loop_stop" else value
    if a.sampling_defaults:
        changes["sampling"] = None
    elif sampling:
        changes["sampling"] = sampling
    d = svc.update(a.name, **changes) if changes else svc.open(a.name, messages=False)
    m = d.meta
    lim = m.get("output_limit")
    rows = [("model", d.model), ("kernel", svc.kernel_choice(d).label()),
            ("system", d.system or "(none)"),
            ("max tokens", str(m.get("max_tokens", "the model's default"))),
            ("sampling", ", ".join(f"{k}={v}" for k, v in (m.get("sampling") or {}).items()) or "defaults"),
            ("output limit", "off" if lim == 0 else (",".join(str(lim[k]) for k in ("head", "tail", "chars"))
                                                     if isinstance(lim, dict) else "default"))]
    for k, v in rows:
        out.print(plain(f"{k:13s} {v}"))


def _args_config(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("--model")
    sp.add_argument("--system", help="system prompt ('-' reads standard input)")
    sp.add_argument("--output-limit", metavar="HEAD,TAIL,CHARS|off|default")
    sp.add_argument("--max-tokens", metavar="N|default", help="longest answer, in tokens")
    sp.add_argument("--sampling", action="append", metavar="KEY=VALUE",
                    help="local models: repeat_penalty, repeat_last_n, dry_multiplier (0 turns DRY "
                         "off), dry_base, dry_allowed_length, dry_last_n, loop_stop (on/off)")
    sp.add_argument("--sampling-defaults", action="store_true", help="back to the default sampling")


def _args_new(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("--model", help="model name (default: $DIALOGUE_MODEL or local:default)")
    sp.add_argument("--system", help="system prompt")
    sp.add_argument("--output-limit", metavar="HEAD,TAIL,CHARS",
                    help="how much of a long code output the model sees: first and last lines and "
                         "at most CHARS characters (default 20,10,2000; 'off' sends it all)")
    sp.add_argument("--folder", metavar="PATH",
                    help="create it in this folder; it starts from the folder's template if it "
                         "has one")
    sp.add_argument("--no-template", action="store_true",
                    help="start empty even where the folder has a template")


def _args_list(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--trash", action="store_true", help="list trashed dialogues instead")
    sp.add_argument("--folder", metavar="PATH",
                    help="only the dialogues in this folder and the folders below it")
    sp.add_argument("--json", action="store_true")


def _args_rm(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg", nargs="?")


def _args_restore(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg", nargs="?")
    sp.add_argument("version", nargs="?", type=int)


def _args_fork(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("msg")
    sp.add_argument("--name", dest="new_name")


def _args_rename(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("new_name")


def _args_search(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("query")
    sp.add_argument("--in", dest="within", metavar="NAME")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")


def _args_attach(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("path", metavar="PATH", nargs="?",
                    help="a text file or a folder (its text files); '-' reads standard input, "
                         "with --name")
    sp.add_argument("--package", metavar="P",
                    help="an installed package's documentation (README, llms.txt, docstrings)")
    sp.add_argument("--url", metavar="U", help="a web page's text (http or https)")
    sp.add_argument("--name", "--as", dest="as_name", metavar="ITEM",
                    help="the item's name (default: the file, folder or package name, the URL's "
                         "host and page); an item of that name is replaced")
    sp.add_argument("--refresh", nargs="?", const="", metavar="ITEM",
                    help="read the attached ITEM (default: every item with a source) again")
    sp.add_argument("--json", action="store_true", help="with no source: the items as JSON")


def _args_detach(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("item", help="the attached item's name")



def _args_trash(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true")


COMMANDS = {
    "new": (cmd_new, "create a dialogue", _args_new),
    "config": (cmd_config, "show or change a dialogue's settings (model, system, max tokens, "
                           "sampling, output limit)", _args_config),
    "list": (cmd_list, "list dialogues", _args_list),
    "rm": (cmd_rm, "move a dialogue, or one of its messages, to the trash", _args_rm),
    "restore": (cmd_restore, "restore a trashed dialogue or message, or an earlier version",
                _args_restore),
    "fork": (cmd_fork, "new dialogue with the messages up to and including MSG", _args_fork),
    "rename": (cmd_rename, "rename a dialogue", _args_rename),
    "search": (cmd_search, "full-text search across all dialogues", _args_search),
    "trash": (cmd_trash, "list what is in the trash", _args_trash),
    "attach": (cmd_attach, "attach a file, folder, package's docs or web page as context every "
                           "prompt of the dialogue sees; refresh or list attached items",
               _args_attach),
    "detach": (cmd_detach, "remove an attached context item", _args_detach),
}
