"""Files in and out: import a notebook as a dialogue, export a dialogue as a notebook, a module,
a post or a page."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.text import Text

from ..service import DialogueService, NameTakenError
from ..terminal import markup, plain
from .common import UserError, err, out


def import_warnings(svc: DialogueService, d: Any, command: str, file: str) -> None:
    """One line on stderr for each setting of the notebook that the import set aside
    (trust.vet_import), and how to adopt its system prompt."""
    rec = svc.import_record(d)
    # Text: never parsed as markup; what came from the file is quoted with repr (controls escaped)
    for w in rec.get("warnings", []):
        err.print(Text(f"warning: {w}"))
    system = rec.get("system")
    if isinstance(system, str) and system:
        snippet = repr(system if len(system) <= 100 else system[:100] + "…")
        err.print(Text(f"  its system prompt: {snippet}; `dialogue {command} --trust "
                       f"{shlex.quote(file)}` adopts it"))


def cmd_import(svc: DialogueService, a: argparse.Namespace) -> None:
    from .. import artifacts  # markdown, sanitizer and nbformat load only for the commands using them
    from .progress import Bars
    if a.folder:
        svc.folder_id(a.folder)  # an unknown folder is refused before the file is read
    try:
        with Bars() as bars:  # a large notebook takes seconds to parse, convert and store
            doc = artifacts.read_notebook(a.file, keep_ids=True, on_progress=bars)
            d = svc.import_dialogue(doc, name=a.new_name, trust=a.trust, on_progress=bars,
                                    folder=a.folder)
    except NameTakenError as e:
        raise UserError(f"{e}: import it under another name with --name") from None
    where = f" in folder {svc.folder(d.folder).path!r}" if d.folder else ""
    out.print(f"imported {len(d.messages)} messages into dialogue [b]{markup(d.name)}[/b] "
              f"({markup(d.id)}){markup(where)}")
    import_warnings(svc, d, "import", a.file)


def _safe_filename(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "dialogue"


def cmd_export(svc: DialogueService, a: argparse.Namespace) -> None:
    from .. import artifacts
    d = svc.open(a.name)
    ext = {"ipynb": ".ipynb", "py": ".py", "md": ".md", "html": ".html"}[a.to]
    to_stdout = a.output == "-"
    path = Path(a.output) if a.output and not to_stdout else Path(_safe_filename(d.name) + ext)
    if a.to == "ipynb":
        data = artifacts.to_ipynb_bytes(svc.for_notebook(d))
    elif a.to == "py":
        data = artifacts.to_module(d).encode()
    elif a.to == "md" and not to_stdout:
        data = None
        artifacts.write_markdown(d, path, with_ai=a.with_ai, with_hidden=a.with_hidden)
    elif a.to == "md":  # one self-contained text: images inlined
        data = artifacts.to_markdown(d, with_ai=a.with_ai, with_hidden=a.with_hidden).text.encode()
    else:
        data = artifacts.to_html(d, with_ai=a.with_ai, remote_images=a.remote_images,
                                 with_hidden=a.with_hidden).encode()
    if to_stdout:
        sys.stdout.flush()
        sys.stdout.buffer.write(data or b"")
        sys.stdout.buffer.flush()
    else:
        if data is not None:
            path.write_bytes(data)
        out.print(plain(f"wrote {path}"))
    hidden = artifacts.hidden_left_out(d, a.with_ai) if a.to in ("md", "html") else 0
    if hidden and not a.with_hidden:
        err.print(plain(f"note: {hidden} hidden message{'s' * (hidden != 1)} left out "
                        "(--with-hidden keeps them)"))


def _args_import(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file")
    sp.add_argument("--name", dest="new_name")
    sp.add_argument("--folder", metavar="PATH", help="import it into this folder")
    sp.add_argument("--trust", action="store_true",
                    help="adopt the notebook's system prompt (a file's model is used only if you "
                         "configured it)")


def _args_export(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("--to", choices=("ipynb", "py", "md", "html"), required=True)
    sp.add_argument("-o", "--output", help="the file to write ('-': standard output)")
    sp.add_argument("--with-ai", action="store_true", help="include prompts and answers (md, html)")
    sp.add_argument("--with-hidden", action="store_true",
                    help="md, html: keep the messages hidden from the model (left out by default)")
    sp.add_argument("--remote-images", action="store_true",
                    help="html: load the images notes and answers link from the web when the page "
                         "is opened (by default they show as links and nothing is fetched)")


COMMANDS = {
    "import": (cmd_import, "import a notebook (.ipynb) as a new dialogue", _args_import),
    "export": (cmd_export, "export a dialogue as a notebook, module, post or page", _args_export),
}
