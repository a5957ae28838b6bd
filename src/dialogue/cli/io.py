"""Files in and out: import a notebook as a dialogue, export a dialogue as a notebook, a module,
a post or a page."""
from __future__ import annotations

import argparse
import re
import shlex
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
    doc = artifacts.read_notebook(a.file, keep_ids=True)
    try:
        d = svc.import_dialogue(doc, name=a.new_name, trust=a.trust)
    except NameTakenError as e:
        raise UserError(f"{e}: import it under another name with --name") from None
    out.print(f"imported {len(d.messages)} messages into dialogue [b]{markup(d.name)}[/b] "
              f"({markup(d.id)})")
    import_warnings(svc, d, "import", a.file)


def _safe_filename(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "dialogue"


def cmd_export(svc: DialogueService, a: argparse.Namespace) -> None:
    from .. import artifacts
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


def _args_import(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file")
    sp.add_argument("--name", dest="new_name")
    sp.add_argument("--trust", action="store_true",
                    help="adopt the notebook's system prompt (a file's model is used only if you "
                         "configured it)")


def _args_export(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name")
    sp.add_argument("--to", choices=("ipynb", "py", "md", "html"), required=True)
    sp.add_argument("-o", "--output")
    sp.add_argument("--with-ai", action="store_true", help="include prompts and answers (md, html)")
    sp.add_argument("--remote-images", action="store_true",
                    help="html: load the images notes and answers link from the web when the page "
                         "is opened (by default they show as links and nothing is fetched)")


COMMANDS = {
    "import": (cmd_import, "import a notebook (.ipynb) as a new dialogue", _args_import),
    "export": (cmd_export, "export a dialogue as a notebook, module, post or page", _args_export),
}
