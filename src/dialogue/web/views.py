"""FT components of the web app: pages, cells and the fragments HTMX swaps in.

Every piece of text that came from a user, a notebook or a model reaches the page either as an FT
text child (escaped by FastHTML) or as HTML from `dialogue.render` (sanitized by nh3); nothing
else is wrapped in `NotStr`. HTML outputs of code are the one exception: they keep their markup
and go into an `<iframe srcdoc>` that is sandboxed without scripts or same-origin access, so they
can neither run code nor reach the app.
"""
from __future__ import annotations

import html
import json
import re
import secrets
import time
from collections import OrderedDict
from typing import Any, Iterable

from fastcore.xml import Safe

from fasthtml.common import (A, Button, Code, Details, Dialog, Div, Fieldset, Form, H2, H3,
                             Header, Iframe, Input, Label, Legend, Li, Link, Main, Meta, NotStr, Option, P,
                             Pre, Script, Section, Select, Small, Span, Strong, Summary,
                             Table, Tbody, Td, Textarea, Th, Thead, Title, Tr, Ul, to_xml)
from fasthtml.common import Progress as Progress_  # the <progress> tag

from ..artifacts.markdown import merge_streams
from ..document import Dialogue, Kind, Message
from ..render import (highlight_code, highlight_css, output_css, pick_mime, render_markdown,
                      render_output, stream_update_html)
from . import paths as urls
from ..service import (HIT_END, HIT_START, MODES, AdapterView, Folder, LiveState, SearchHit,
                       TrashItem, mode_of)

__all__ = ["page_hdrs", "dialogues_page", "dialogue_list", "dialogue_row", "dialogue_row_edit",
           "search_results", "dialogue_page", "cell", "result", "outputs_html", "toast",
           "kernel_badge", "totals", "history_modal", "settings_panel", "dialogue_title",
           "sse", "frag", "gutter", "output_fragment", "text_chunk", "error_box", "tool_calls_html", "approval_box", "live_body", "version_input",
           "dversion_input", "model_picker", "answer_editor", "toolbar", "model_input", "HTMX_CONFIG",
           "adapter_badges", "adapters_control", "adapter_rows", "trial_dialog", "trial_out",
           "trial_column", "trial_status", "keep_button", "adapter_origin", "run_all_control",
           "run_all_progress", "AdapterView", "read_progress", "input_box", "kernel_picker",
           "restart_confirm", "python_dialog"]

STATIC = "/static"
VENDOR = f"{STATIC}/vendor"

# htmx settings: no eval and no <script> from swapped HTML (defence in depth under the CSP), our
# own indicator styles, and error answers swapped like 2xx: the server answers a refused change
# (4xx) or a failure (5xx) with an error toast swapped out-of-band (and HX-Reswap: none), so the
# user sees why.
HTMX_CONFIG = {
    "allowEval": False,
    "allowScriptTags": False,
    "includeIndicatorStyles": False,
    "selfRequestsOnly": True,
    "historyCacheSize": 0,
    "defaultSettleDelay": 0,
    "responseHandling": [
        {"code": "204", "swap": False},
        {"code": "[23]..", "swap": True},
        {"code": "4..", "swap": True, "error": False},
        {"code": "5..", "swap": True, "error": False},
    ],
}


def page_hdrs() -> list:
    """The <head> of every page: only files served by this app (see static/VENDORED.md)."""
    return [
        Meta(charset="utf-8"),
        Meta(name="viewport", content="width=device-width, initial-scale=1"),
        Meta(name="htmx-config", content=json.dumps(HTMX_CONFIG)),
        Meta(name="color-scheme", content="light"),
        Link(rel="icon", href=f"{STATIC}/favicon.svg", type="image/svg+xml"),
        Link(rel="stylesheet", href=f"{VENDOR}/pico/pico.min.css"),
        Link(rel="stylesheet", href=f"{VENDOR}/codemirror/codemirror.css"),
        Link(rel="stylesheet", href=f"{STATIC}/highlight.css"),
        Link(rel="stylesheet", href=f"{STATIC}/app.css"),
        Link(rel="stylesheet", href=f"{STATIC}/adapters.css"),
        Script(src=f"{VENDOR}/htmx/htmx.min.js"),
        Script(src=f"{VENDOR}/htmx-ext-sse/sse.min.js"),
        Script(src=f"{VENDOR}/codemirror/codemirror.js", defer=True),
        Script(src=f"{VENDOR}/codemirror/mode/python/python.js", defer=True),
        Script(src=f"{VENDOR}/codemirror/mode/markdown/markdown.js", defer=True),
        Script(src=f"{VENDOR}/codemirror/addon/edit/matchbrackets.js", defer=True),
        Script(src=f"{STATIC}/app.js", defer=True),
    ]


def highlight_stylesheet() -> str:
    """Code highlighting, and the classes of what `render` writes (ANSI colours, maths, the
    box of a long output): the same rules as the HTML export."""
    return highlight_css("default") + "\n" + output_css()


# ---------------------------------------------------------------- small pieces

def _ago(t: float | None) -> str:
    if not t:
        return ""
    s = max(0, time.time() - t)
    for n, unit in ((86400 * 365, "y"), (86400 * 30, "mo"), (86400, "d"), (3600, "h"), (60, "min")):
        if s >= n:
            return f"{int(s // n)} {unit} ago"
    return "just now"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def version_input(m: Message, oob: bool = False) -> Any:
    return Input(type="hidden", name="version", value=str(m.version), id=f"v-{m.id}",
                 hx_swap_oob="true" if oob else None)


def dversion_input(d: Dialogue, oob: bool = False) -> Any:
    return Input(type="hidden", name="dversion", value=str(d.version), id="dversion",
                 hx_swap_oob="true" if oob else None)


def toast(message: str, *, level: str = "error", undo: str | None = None,
          undo_label: str = "Undo", extra: Any = None) -> Any:
    """A message at the bottom of the page, swapped out-of-band into #toast."""
    parts: list[Any] = [Span(message, cls="toast-text")]
    if undo:
        parts.append(Button(undo_label, hx_post=undo, data_act="undo", cls="secondary"))
    if extra is not None:
        parts.append(extra)
    parts.append(Button("×", cls="toast-close", data_act="close-toast", aria_label="close",
                        type="button"))
    return Div(*parts, id="toast", cls=f"toast {level}", role="alert" if level == "error" else "status",
               hx_swap_oob="true")


def topbar(*left: Any, right: Iterable[Any] = ()) -> Any:
    return Header(
        Div(A(Span("◆", cls="logo"), "dialogue", href=urls.index, cls="brand"), *left, cls="bar-left"),
        Div(*right, cls="bar-right"), cls="topbar")


# ---------------------------------------------------------------- dialogues page

def dialogues_page(items: list[dict], trash: list[TrashItem], *, q: str = "",
                   hits: list[SearchHit] | None = None, folders: list[Folder] | None = None,
                   folder: str = "") -> tuple:
    search = Input(type="search", name="q", value=q, placeholder="Search every dialogue…",
                   aria_label="Search every dialogue", hx_get=urls.search,
                   hx_trigger="input changed delay:250ms, search", hx_target="#search-results",
                   id="search", autocomplete="off")
    folders = folders or []
    new = Form(Input(name="name", placeholder="New dialogue name", required=True,
                     aria_label="New dialogue name", autocomplete="off"),
               folder_select(folders, folder, label="Folder of the new dialogue (its template, "
                                                    "if it has one, is where it starts)")
               if folders else "",
               Button("New dialogue", type="submit"),
               hx_post=urls.new, cls="inline-form", id="new-form")
    job = secrets.token_urlsafe(12)  # names this page's import, whose progress the box follows
    imp = Form(Label(Input(type="file", name="file", accept=".ipynb,application/x-ipynb+json",
                           required=True), cls="file-label"),
               Input(type="hidden", name="job", value=job),
               Input(type="hidden", name="folder", value=folder),  # into the folder shown
               Button("Import .ipynb", type="submit", cls="secondary"),
               hx_post=urls.import_notebook, hx_encoding="multipart/form-data", cls="inline-form",
               id="import-form")
    imp_progress = Div(id="import-progress", hx_get=urls.progress_box.to(job=job),
                       hx_trigger="submit from:#import-form", hx_swap="innerHTML")
    return (Title("dialogue"),
            topbar(A("Training", href=urls.training, cls="secondary small"),
                   A("Cache", href=urls.cache, cls="secondary small"), right=[search]),
            Main(Section(new, imp, cls="actions"), imp_progress,
                 Div(search_results(hits, q) if hits is not None else "", id="search-results"),
                 folders_section(folders, folder),
                 dialogue_list(items, trash, folder=folder), cls="container page-list"),
            Div(id="toast"), Div(id="modal"))


def dialogue_list(items: list[dict], trash: list[TrashItem], *, folder: str = "") -> Any:
    """The dialogues grouped by folder (the top level first, then in path order; most recently
    updated first within each), only those in `folder` and below it when one is chosen."""
    if folder:
        items = [d for d in items if d.get("folder_path") == folder
                 or str(d.get("folder_path", "")).startswith(folder + "/")]
    groups: dict[str, list[dict]] = {}
    for d in sorted(items, key=lambda d: str(d.get("folder_path") or "").split("/")
                    if d.get("folder_path") else []):
        groups.setdefault(str(d.get("folder_path") or ""), []).append(d)
    rows: list[Any] = []
    for path, ds in groups.items():
        if path or len(groups) > 1:
            rows.append(Tr(Th(A(path, href=urls.index.to(folder=path)) if path else "Top level",
                              colspan="5"), cls="folder-group", data_folder=path))
        rows += [dialogue_row(d) for d in ds]
    body = (Table(Thead(Tr(Th("Name"), Th("Model"), Th("Messages"), Th("Updated"), Th(""))),
                  Tbody(*rows, id="dialogue-rows"), cls="dialogues")
            if rows else P(f"No dialogues in “{folder}” yet." if folder else
                           "No dialogues yet: name one above and press New dialogue, or import a "
                           "notebook.", cls="empty"))
    trash_section = Details(
        Summary(f"Trash ({len(trash)})"),
        Ul(*[trash_item(t) for t in trash]) if trash else P("The trash is empty.", cls="empty"),
        cls="trash")
    title = (H2("Dialogues in “", folder, "” ", A("show all", href=urls.index, cls="small"))
             if folder else H2("Dialogues"))
    shown = Input(type="hidden", name="shown", value=folder, id="list-folder")
    return Div(title, shown, body, trash_section, id="dialogue-list")


def folder_select(folders: list[Folder], current: str = "", *, label: str,
                  name: str = "folder") -> Any:
    """A picker of folders by path, "(top level)" first."""
    return Select(Option("(top level)", value="", selected=not current),
                  *[Option(f.path, value=f.path, selected=f.path == current) for f in folders],
                  name=name, aria_label=label, cls="folder-select")


def folders_section(folders: list[Folder], current: str = "") -> Any:
    """The folders: each a filter of the list, with its settings (path, the note its dialogues
    see first, the template new ones start from) a click away; a form to make one."""
    new = Form(Input(name="path", placeholder="New folder, e.g. work/analysis", required=True,
                     aria_label="New folder path", autocomplete="off"),
               Button("New folder", type="submit", cls="secondary"),
               hx_post=urls.folders, cls="inline-form", id="new-folder-form")
    items = [Li(A(f.path, href=urls.index.to(folder=f.path), cls="folder-link",
                  aria_current="true" if f.path == current else None),
                Small(f" {f.dialogues} dialogue{'s' * (f.dialogues != 1)}"),
                Small(" · note", title=f.note[:300], cls="has-note") if f.note.strip() else "",
                Small(" · template", cls="has-template") if f.template else "",
                Button("Settings", hx_get=urls.folder.to(fid=f.id), hx_target="#folder-edit",
                       cls="outline secondary small", data_act="folder-settings"),
                data_folder=f.path)
             for f in folders]
    return Details(Summary(f"Folders ({len(folders)})"), new,
                   Ul(*items, cls="folders") if items else
                   P("No folders yet. A folder groups dialogues; its note is sent first to every "
                     "dialogue in it, and its template is where new ones start.", cls="empty"),
                   Div(id="folder-edit"), cls="folders-section", open=bool(current) or None,
                   id="folders")


def folder_history(f: Folder, history: list[Any]) -> Any:
    """A folder's versions, newest first: what each changed, and an earlier note to take back
    (as a new version: the history itself is never rewritten)."""
    items = []
    for v in reversed(history):
        note = str(v.state.get("note") or "")
        first = (note.strip().splitlines() or [""])[0]
        items.append(Li(Small(f"v{v.version} · {v.op} · {_ago(v.at)} · ", title=_when(v.at)),
                        Small(f"{v.state.get('name')} · "),
                        Small(f"note: {first[:80]}{'…' if len(note.strip()) > len(first[:80]) else ''}"
                              if note.strip() else "no note"),
                        Button("Use this note", type="button", hx_post=urls.folder.to(fid=f.id),
                               hx_vals={"note": note}, cls="outline secondary small",
                               data_act="folder-use-note")
                        if note != f.note else ""))
    return Details(Summary(Small(f"History ({len(history)} version{'s' * (len(history) != 1)})")),
                   Ul(*items, cls="folder-history"), cls="folder-history-box")


def folder_form(f: Folder, dialogues: list[dict], *, error: str = "",
                history: list[Any] | None = None) -> Any:
    """A folder's settings: its path (a rename or move), its context note, its template, and
    deleting it (only empty, or with what it holds moved up a level), with its history."""
    return Form(
        H3("Folder “", f.path, "”"),
        Input(type="hidden", name="fversion", value=str(f.version)),
        Label("Path (renaming moves what it holds with it)",
              Input(name="path", value=f.path, required=True)),
        Label("Context note: every dialogue in this folder and below it sees it first, right "
              "after the system prompt (part of the cached prefix)",
              Textarea(_ta(f.note), name="note", rows="5",
                       placeholder="e.g. We use polars, not pandas. Dates are UTC.")),
        Label("Template: new dialogues in this folder start from this dialogue (its messages, "
              "model, system prompt and settings)",
              Select(Option("(none)", value="", selected=not f.template),
                     *[Option(d["name"], value=d["id"], selected=d["id"] == f.template)
                       for d in dialogues], name="template")),
        Small(error, cls="error") if error else "",
        Div(Button("Save folder", type="submit", cls="small"),
            Button("Delete folder", hx_post=urls.folder_delete.to(fid=f.id), type="button",
                   hx_confirm=f"Delete the folder “{f.path}”? Only an empty folder is deleted.",
                   cls="outline secondary small danger", data_act="folder-delete"),
            Button("Delete, moving contents up", hx_post=urls.folder_delete.to(fid=f.id, up=1),
                   type="button", cls="outline secondary small danger", data_act="folder-delete-up",
                   hx_confirm=f"Delete the folder “{f.path}” and move its dialogues and folders "
                              "into the folder above it?"),
            Button("Close", type="button", cls="outline secondary small",
                   hx_get=urls.folder.to(fid=f.id, close=1), hx_target="#folder-edit"),
            cls="row"),
        folder_history(f, history) if history else "",
        hx_post=urls.folder.to(fid=f.id), cls="folder-form", id="folder-form")


def move_row(d: Dialogue, folders: list[Folder], current: str, *, error: str = "") -> Any:
    """A dialogue's row as a move form: pick its folder."""
    return Tr(Td(Form(Strong(d.name), Span(" → "),
                      folder_select(folders, current, label=f"Folder to move {d.name} into"),
                      Input(type="hidden", name="dversion", value=str(d.version)),
                      Button("Move", type="submit", cls="small"),
                      Button("Cancel", hx_get=urls.row.to(did=d.id), hx_target="closest tr",
                             hx_swap="outerHTML", type="button", cls="secondary small"),
                      Small(error, cls="error") if error else "",
                      hx_post=urls.move_to.to(did=d.id), hx_target="#dialogue-list",
                      hx_swap="outerHTML", hx_include="#list-folder", cls="inline-form"),
                 colspan="5"),
              id=f"row-{d.id}")


def trash_item(t: TrashItem) -> Any:
    """A trashed dialogue, or a trashed message under its dialogue's name and the place it
    takes again when restored."""
    if t.type == "dialogue":
        what = (Span(t.name, cls="name"), Small(" dialogue"))
        url = urls.restore.to(did=t.id)
    else:
        what = (Span(t.dialogue_name, cls="name"), Small(f" cell {t.position}: "),
                Code(t.name or "(empty)"))
        url = urls.undelete.to(did=t.dialogue_id, mid=t.id, to="list")
    return Li(*what, Small(f" deleted {_ago(t.deleted)}"),
              Button("Restore", hx_post=url, cls="secondary small"), cls=f"trash-{t.type}")


def dialogue_row(d: dict) -> Any:
    did = d["id"]
    return Tr(
        Td(A(d["name"], href=urls.dialogue.to(did=did), cls="dlg-link")),
        Td(Code(d.get("model") or ""),
           adapter_badges(d.get("adapters") or {}, inactive=not str(d.get("model") or "")
                          .startswith("local:")) if d.get("adapters") else ""),
        Td(str(d.get("messages", 0))),
        Td(Span(_ago(d.get("updated")), title=_when(d.get("updated")))),
        Td(Button("Rename", hx_get=urls.row.to(did=did, edit=1), hx_target="closest tr",
                  hx_swap="outerHTML", cls="outline secondary small"),
           Button("Move", hx_get=urls.move_to.to(did=did), hx_target="closest tr",
                  hx_swap="outerHTML", cls="outline secondary small", data_act="move"),
           Button("Delete", hx_post=urls.delete.to(did=did), hx_target="closest tr",
                  hx_swap="outerHTML", cls="outline secondary small danger"), cls="row-actions"),
        id=f"row-{did}")


def dialogue_row_edit(d: Dialogue, *, error: str = "") -> Any:
    return Tr(Td(Form(Input(name="name", value=d.name, aria_label="New name", autofocus=True,
                            required=True),
                      Input(type="hidden", name="dversion", value=str(d.version)),
                      Button("Save", type="submit"),
                      Button("Cancel", hx_get=urls.row.to(did=d.id), hx_target="closest tr",
                             hx_swap="outerHTML", type="button", cls="secondary"),
                      Small(error, cls="error") if error else "",
                      hx_post=urls.rename.to(did=d.id), hx_target="closest tr", hx_swap="outerHTML",
                      cls="inline-form"), colspan="5"),
              id=f"row-{d.id}")


def hit_snippet(snippet: str) -> Any:
    """A search snippet with its HIT markers as <mark>; everything else escaped."""
    out: list[str] = []
    rest = snippet
    while HIT_START in rest:
        before, _, after = rest.partition(HIT_START)
        hit, _, rest = after.partition(HIT_END)
        out.append(html.escape(before) + "<mark>" + html.escape(hit) + "</mark>")
    out.append(html.escape(rest))
    return NotStr("".join(out))


def search_results(hits: list[SearchHit] | None, q: str) -> Any:
    if hits is None or not q.strip():
        return ""
    if not hits:
        return Div(P(f"Nothing matches “{q}”.", cls="empty"), cls="search-results")
    return Div(H3(f"{len(hits)} match{'es' if len(hits) != 1 else ''}"),
               Ul(*[Li(A(Strong(h.dialogue_name), href=urls.dialogue.to(did=h.dialogue_id) + f"#m-{h.message_id}"),
                       Span(h.kind, cls=f"kind-chip {h.kind}"),
                       Div(hit_snippet(h.snippet), cls="snippet"))
                    for h in hits], cls="hits"), cls="search-results")


# ---------------------------------------------------------------- dialogue page

def dialogue_title(d: Dialogue, oob: bool = False) -> Any:
    return Form(Input(name="name", value=d.name, aria_label="Dialogue name", cls="title-input",
                      required=True, autocomplete="off", title=d.name),
                hx_post=urls.settings.to(did=d.id), hx_trigger="change, submit",
                hx_include="#dversion", id="dlg-title", cls="title-form",
                hx_swap_oob="true" if oob else None)


def model_picker(d: Dialogue, models: list[tuple[str, str]], oob: bool = False) -> Any:
    names = [m for m, _ in models]
    opts = [Option(label, value=m, selected=(m == d.model)) for m, label in models]
    if d.model not in names:
        opts.insert(0, Option(d.model or "(none)", value=d.model, selected=True))
    return Select(*opts, name="model", aria_label="Model", id="model",
                  hx_post=urls.settings.to(did=d.id), hx_trigger="change", hx_include="#dversion",
                  title="The model that answers prompts in this dialogue",
                  hx_swap_oob="true" if oob else None)


def model_input(d: Dialogue, oob: bool = False) -> Any:
    """The free-text model field of the settings panel (kept in step with the picker)."""
    return Input(name="model", value=d.model, autocomplete="off", id="model-name",
                 hx_swap_oob="true" if oob else None)


def kernel_badge(did: str, status: str) -> Any:
    label = {"none": "no kernel", "idle": "kernel idle", "busy": "kernel busy",
             "dead": "kernel dead", "restarting": "restarting…"}.get(status, status)
    restarting = status == "restarting"
    return Div(Span(Span(cls="dot"), label, cls=f"kstatus {status}", title="Kernel status",
                    role="status"),
               Button("■", title="Interrupt the kernel", hx_post=urls.kernel_interrupt.to(did=did),
                      hx_target="#kernel", hx_swap="outerHTML", cls="icon",
                      disabled=status in ("none", "dead", "restarting")),
               # asks first (restart_confirm): a restart loses every variable
               Button("⟳", title="Restart the kernel (variables are lost)",
                      hx_get=urls.kernel_restart.to(did=did), hx_target="#modal",
                      hx_swap="innerHTML", cls="icon", data_act="restart-kernel",
                      disabled=restarting),
               id="kernel", cls="kernel", hx_get=urls.kernel.to(did=did),
               # while it restarts, look often: the page says "idle" as soon as it is
               hx_trigger="every 0.5s" if restarting else "every 3s", hx_swap="outerHTML")


def restart_confirm(did: str, status: str) -> Any:
    """The question before a restart, in the page's modal (not window.confirm)."""
    running = " The cell running now is stopped." if status == "busy" else ""
    return Dialog(Div(Header(H3("Restart the kernel?"),
                             Button("×", data_act="close-modal", cls="icon", type="button",
                                    aria_label="Close")),
                      P("A fresh kernel starts; every variable of this dialogue is lost." + running),
                      Div(Button("Restart", hx_post=urls.kernel_restart.to(did=did),
                                 hx_target="#kernel", hx_swap="outerHTML",
                                 data_act="confirm-restart", autofocus=True),
                          Button("Cancel", data_act="close-modal", type="button",
                                 cls="secondary"),
                          cls="modal-actions"),
                      cls="modal-body"),
                  open=True, id="restart-confirm", cls="modal", aria_label="Restart the kernel")


PYTHON_CHOICE = "python:"  # the picker's "Python interpreter…" entry


def kernel_picker(d: Dialogue, specs: dict[str, str], label: str, oob: bool = False, *,
                  gateway: dict[str, str] | None = None) -> Any:
    """Which kernel runs the dialogue's code: the app's own Python, an installed Jupyter
    kernelspec, a kernel of the configured gateway ({name: display name}: `gateway`), or a
    Python interpreter by path (asked for in `python_dialog`)."""
    current = d.meta.get("kernel") if isinstance(d.meta.get("kernel"), dict) else {}
    value = (f"spec:{current['spec']}" if current.get("spec") else
             f"python:{current['python']}" if current.get("python") else
             f"gateway:{current['gateway']}" if current.get("gateway") else "")
    opts = [Option("Python 3 (dialogue)", value="", selected=value == "")]
    opts += [Option(name_, value=f"spec:{n}", selected=value == f"spec:{n}")
             for n, name_ in specs.items()]
    opts += [Option(f"{name_} (gateway)", value=f"gateway:{n}", selected=value == f"gateway:{n}")
             for n, name_ in (gateway or {}).items()]
    if value and not any(o.value == value for o in opts):  # a path, or a spec since removed
        opts.append(Option(label, value=value, selected=True))
    opts.append(Option("Python interpreter…", value=PYTHON_CHOICE))
    return Select(*opts, name="kernel", aria_label="Kernel", id="kernel-pick",
                  hx_post=urls.kernel_choice.to(did=d.id), hx_trigger="change",
                  hx_include="#dversion", title=f"The kernel that runs this dialogue's code: {label}",
                  hx_swap_oob="true" if oob else None)


def python_dialog(did: str) -> Any:
    """Asks for the path of a Python interpreter to run the dialogue's kernel."""
    return Dialog(Div(Header(H3("Run the kernel with a Python interpreter"),
                             Button("×", hx_get=urls.kernel_choice.to(did=did), hx_swap="none",
                                    cls="icon", type="button", aria_label="Close")),
                      Form(Label("Path of the interpreter",
                                 Input(name="python", placeholder="/path/to/venv/bin/python",
                                       autocomplete="off", required=True, autofocus=True)),
                           P("It needs ipykernel (python -m pip install ipykernel).", cls="hint"),
                           Input(type="hidden", name="kernel", value=PYTHON_CHOICE),
                           Div(Button("Use it", type="submit", data_act="use-python"),
                               Button("Cancel", hx_get=urls.kernel_choice.to(did=did),
                                      hx_swap="none", type="button", cls="secondary"),
                               cls="modal-actions"),
                           hx_post=urls.kernel_choice.to(did=did), hx_include="#dversion"),
                      cls="modal-body"),
                  open=True, id="python-kernel", cls="modal", aria_label="Python interpreter")


def _usage_sum(msgs: Iterable[Message]) -> tuple[int, int, int, float, bool]:
    tin = tout = tcache = 0
    total, unknown = 0.0, False
    for m in msgs:
        u = m.usage or {}
        if not u:
            continue
        tin += int(u.get("input") or 0)
        tout += int(u.get("output") or 0)
        tcache += int(u.get("cache_read") or 0) + int(u.get("cache_write") or 0)
        c = u.get("cost")
        if c is None:
            unknown = True
        else:
            total += float(c)
    return tin, tout, tcache, total, unknown


def _money(c: float | None) -> str:
    if c is None:
        return "cost unknown"
    return f"${c:.4f}" if c < 1 else f"${c:.2f}"


def totals(d: Dialogue, oob: bool = False) -> Any:
    tin, tout, tcache, cost, unknown = _usage_sum(d.messages)
    from ..service import DialogueService
    chart = DialogueService.usage_chart(d)  # SVG built from the stored numbers, words escaped
    return Div(Span(f"{tin + tcache:,} in", title=f"prompt tokens: {tin:,} new + {tcache:,} from cache"),
               Span(f"{tout:,} out", title="answer tokens"),
               Span(_money(cost) + ("+?" if unknown else ""),
                    title="cost of every answer in this dialogue" +
                          (" (some models have no known price)" if unknown else "")),
               Details(Summary("chart", title="tokens and cost over the answers"),
                       Div(NotStr(chart), cls="chart-box"), cls="menu usage-chart") if chart else "",
               id="totals", cls="totals", hx_swap_oob="true" if oob else None)


def export_menu(did: str) -> Any:
    """The export links. app.js fetches them: a refusal is told in a toast, the page stays."""
    return Details(Summary("Export", role="button", cls="secondary small"),
                   Ul(*[Li(A(label, href=urls.export.to(did=did, fmt=fmt, ai=ai), download=True,
                             data_export=fmt))
                        for fmt, ai, label in (
                            ("ipynb", None, "Notebook (.ipynb)"),
                            ("py", None, "Python module (.py): exported code"),
                            ("md", None, "Markdown post (.md)"),
                            ("md", 1, "Markdown with prompts and answers"),
                            ("html", None, "Web page (.html)"),
                            ("html", 1, "Web page with prompts and answers"))],
                      Li(Label(Input(type="checkbox", name="hidden", data_export_hidden="1"),
                               " Keep hidden cells (md, html)"), cls="export-option")),
                   cls="menu export")


def context_status(d: Dialogue, rows: list[dict[str, Any]]) -> Any:
    """The attached items' tokens, whether the local model's KV cache holds them, and a refresh
    button for those read from a source (a path here, a package, a URL)."""
    cached = {True: ("cached", "its KV state is in the local prefix cache: read from disk"),
              False: ("not cached", "the next prompt reads it, then it is cached"),
              None: ("", "")}
    body = []
    for r in rows:
        label, why = cached[r["cached"]] if not r.get("retrieved") else (
            "retrieved", "too large for the context with the rest: each prompt gets its best chunks")
        tokens = f"{r['tokens']:,}" if r["exact"] else f"~{r['tokens']:,}"
        again = r["kind"] in ("package", "url") or (r["kind"] in ("file", "directory")
                                                     and r["source"].startswith("/"))
        body.append(Tr(Td(r["name"]), Td(r["kind"]), Td(tokens, cls="num ctx-tokens"),
                       Td(label, title=why, cls=f"ctx-cached {label.replace(' ', '-')}"),
                       Td(Button("Refresh", hx_post=urls.context.to(did=d.id),
                                 hx_vals={"action": "refresh", "name": r["name"]},
                                 hx_include="#dversion", type="button", cls="secondary small",
                                 aria_label=f"Refresh {r['name']}") if again else "")))
    total = sum(r["tokens"] for r in rows)
    exact = all(r["exact"] for r in rows)
    return Div(Table(Thead(Tr(Th("Item"), Th("Kind"), Th("Tokens"), Th("Cache"), Th(""))),
                     Tbody(*body), cls="ctx-table"),
               P(f"{total:,} tokens in all" + ("" if exact else " (estimated: this model's "
                                                   "tokenizer is not available here)"), cls="hint"),
               id="ctx-status")


def settings_panel(d: Dialogue, *, open_: bool = False, oob: bool = False) -> Any:
    ctx_items = [Details(Summary(Strong(c.name), Small(f" {c.kind} · {len(c.content):,} chars"
                                                      + (f" · {c.source}" if c.source else ""))),
                         Form(Input(type="hidden", name="action", value="save"),
                              Input(type="hidden", name="name", value=c.name),
                              Textarea(_ta(c.content), name="content", rows="6",
                                       aria_label=f"Content of {c.name}"),
                              Div(Button("Save", type="submit", cls="small"),
                                  Button("Remove", hx_post=urls.context.to(did=d.id),
                                         hx_vals={"action": "remove", "name": c.name},
                                         hx_include="#dversion", type="button",
                                         cls="secondary small danger"), cls="row"),
                              hx_post=urls.context.to(did=d.id), hx_include="#dversion"),
                         cls="ctx-item")
                 for c in d.context]
    add = Form(Input(type="hidden", name="action", value="add"),
               Input(name="name", placeholder="Name (e.g. the library's docs)", required=True,
                     aria_label="Name of the new context item"),
               Textarea(name="content", rows="4", placeholder="Paste text here, or choose a file",
                        aria_label="Content of the new context item"),
               Div(Input(type="file", name="file", aria_label="File to attach"),
                   Button("Attach", type="submit", cls="small"), cls="row"),
               hx_post=urls.context.to(did=d.id), hx_include="#dversion",
               hx_encoding="multipart/form-data", cls="ctx-add")
    # read on the server: a file or folder there, an installed package's docs, a web page
    fetch = Form(Input(type="hidden", name="action", value="source"),
                 Div(Input(name="path", placeholder="File or folder path (on the server)",
                           aria_label="File or folder path to attach"),
                     Input(name="package", placeholder="Installed package, e.g. httpx",
                           aria_label="Package whose docs to attach"),
                     Input(name="url", type="url", placeholder="https://… page",
                           aria_label="URL to attach"), cls="row ctx-sources"),
                 Div(Input(name="name", placeholder="Name (optional)",
                           aria_label="Name of the attached source"),
                     Button("Attach source", type="submit", cls="small"), cls="row"),
                 hx_post=urls.context.to(did=d.id), hx_include="#dversion",
                 hx_disabled_elt="find button", cls="ctx-add ctx-fetch")
    # tokens and the KV cache state need the model's tokenizer (a local model's process):
    # asked for when the panel is shown, not with every page
    status = Div(P("Counting tokens…", cls="hint"), id="ctx-status",
                 hx_get=urls.context_status.to(did=d.id), hx_swap="outerHTML",
                 hx_trigger="load" if open_ else "toggle once from:closest details") \
        if d.context else None
    return Details(
        Summary("Settings: system prompt, model, answers, attached context, MCP servers"
                + (f" ({len(d.context)} attached)" if d.context else "")),
        Div(Form(Label("System prompt", Textarea(_ta(d.system), name="system", rows="3",
                                                 placeholder="Instructions the model sees first")),
                 mode_fields(d),
                 Label("Model name (any provider's: claude-…, gpt-…, "
                       "openai-compatible:URL/model, local:NAME or a .gguf path)",
                       model_input(d)),
                 generation_fields(d),
                 doc_tools_fields(d),
                 approvals_fields(d),
                 Button("Save settings", type="submit", cls="small"),
                 hx_post=urls.settings.to(did=d.id), hx_include="#dversion"),
            Div(H3("Attached context"),
                P("Sent to the model before the dialogue, as part of the stable prefix that "
                  "caches reuse.", cls="hint"),
                status, *ctx_items, fetch, add, cls="context"),
            # its MCP servers (routes/mcp.py), read when the panel is shown
            Div(P("MCP servers…", cls="hint"), id="mcp-settings", hx_get=urls.mcp.to(did=d.id),
                hx_swap="outerHTML",
                hx_trigger="load" if open_ else "toggle once from:closest details"),
            cls="settings-body"),
        id="settings", cls="settings", open=open_, hx_swap_oob="true" if oob else None)


def folder_info(path: str, notes: list[Any]) -> Any:
    """Where the dialogue lives, and the folder notes every prompt of it sends first."""
    crumbs: list[Any] = []
    parts = path.split("/")
    for i, name in enumerate(parts):
        crumbs += [" / " if i else "", A(name, href=urls.index.to(folder="/".join(parts[:i + 1])))]
    shown = [Details(Summary(Small(f"Note of “{n.name}” · {len(n.content):,} characters")),
                     Pre(n.content), cls="folder-note") for n in notes]
    return Div(Small("In folder ", *crumbs,
                     f" · {len(notes)} folder note{'s' * (len(notes) != 1)} sent first" if notes
                     else " · no folder note"),
               *shown, cls="folder-info", id="folder-info")


def mode_fields(d: Dialogue) -> Any:
    """How the model answers: a preset whose text (appended to the system prompt, exactly as
    sent) is shown and editable. Picking another mode without editing the text takes that
    mode's preset text."""
    try:
        name, prompt = mode_of(d.meta)
    except ValueError:  # a hand-edited setting that is not a mode: offer to set one
        name, prompt = "standard", ""
    return Fieldset(
        Label("Mode", Select(*[Option(m, value=m, selected=m == name) for m in MODES],
                             name="mode", aria_label="Mode")),
        Label("Mode text, added to the system prompt (standard adds nothing)",
              Textarea(_ta(prompt), name="mode_prompt", rows="3", aria_label="Mode text")),
        cls="mode-fields")


def output_limit_text(meta: dict) -> str:
    """A dialogue's output limit as the settings field shows it ("" = the defaults)."""
    lim = meta.get("output_limit")
    if lim is None:
        return ""
    if lim == 0:
        return "off"
    return ",".join(str(lim.get(k, "")) for k in ("head", "tail", "chars"))


def dry_on(meta: dict) -> bool:
    """Whether the dialogue's local answers use DRY (on unless its multiplier is set to 0)."""
    s = meta.get("sampling") or {}
    return "dry_multiplier" not in s or float(s["dry_multiplier"]) > 0


def loop_stop_on(meta: dict) -> bool:
    return bool((meta.get("sampling") or {}).get("loop_stop", True))


def generation_fields(d: Dialogue) -> Any:
    """How answers are made: their length, what the model sees of long outputs, and (local
    models) the repetition guards. Blank fields mean the defaults."""
    return Fieldset(
        Legend("Answers"),
        Div(Label("Max tokens", Input(type="number", name="max_tokens", min="1",
                                      value=str(d.meta.get("max_tokens", "")),
                                      placeholder="the model's default")),
            Label("Long outputs the model sees (head,tail,chars)",
                  Input(name="output_limit", value=output_limit_text(d.meta),
                        placeholder="20,10,2000 (off: all of it)")),
            cls="row"),
        Div(Label(Input(type="checkbox", name="dry", value="1", role="switch",
                        checked=dry_on(d.meta)),
                  "Local models: avoid repeating (DRY)"),
            Label(Input(type="checkbox", name="loop_stop", value="1", role="switch",
                        checked=loop_stop_on(d.meta)),
                  "Stop an answer that loops"),
            cls="row"),
        Input(type="hidden", name="generation", value="1"),
        cls="generation")


def doc_tools_fields(d: Dialogue) -> Any:
    """Which document tools the model is offered over this dialogue (all off by default): a
    checkbox each, reading tools first; changing ones ask before they run (approvals)."""
    from ..service import DialogueService
    tools = DialogueService.document_tools()
    chosen = d.meta.get("doc_tools")
    on = {n for n, _, _ in tools} if chosen == "all" else set(chosen or [])
    boxes = [Label(Input(type="checkbox", name="doc_tool", value=n, checked=n in on),
                   Code(n), Small(" reads" if ro else " changes", cls="hint"),
                   title=desc, cls="doc-tool")
             for n, desc, ro in tools]
    return Fieldset(
        Legend("Document tools"),
        P("Let the model read and edit this dialogue: list, read and search messages, add, "
          "edit and run them. Every change it makes is a version you can undo; tools that "
          "change or run anything ask you first.", cls="hint"),
        Div(*boxes, cls="doc-tools"),
        Input(type="hidden", name="doc_tools_form", value="1"),
        cls="doc-tools-fields")


def approvals_fields(d: Dialogue) -> Any:
    """Which tool calls ask first: reading tools too or not, and the tools always allowed in this
    dialogue (from an answer's "Always allow"), each a box to untick to take it back."""
    from ..service import approval_settings
    s = approval_settings(d.meta)
    allowed = [Label(Input(type="checkbox", name="always_tool", value=n, checked=True),
                     Code(n), cls="doc-tool") for n in s["always"]]
    return Fieldset(
        Legend("Approvals"),
        P("Tools that change or run anything ask before each call; untick a tool below to make "
          "it ask again.", cls="hint"),
        Label(Input(type="checkbox", name="ask_reads", value="1", role="switch",
                    checked=s["ask_reads"]),
              "Ask before tools that only read, too"),
        Div(*allowed, cls="doc-tools") if allowed else
        P("No tool is always allowed in this dialogue.", cls="hint"),
        Input(type="hidden", name="approvals_form", value="1"),
        cls="approvals-fields")


def _ta(text: str) -> str:
    """Textarea content: HTML parsers drop one leading newline, so give them one to drop."""
    return "\n" + (text or "")


HELP = [
    ("Command mode (a cell is selected, no editor has focus)", [
        ("Enter", "edit the selected cell"), ("Shift+Enter", "run, then select the next cell"),
        ("Ctrl+Enter", "run in place"), ("j / k or ↓ / ↑", "select the next / previous cell"),
        ("Alt+Enter", "run, then add a code cell below"),
        ("Shift+J / Shift+K", "move the cell down / up"), ("a / b", "add a code cell above / below"),
        ("y / m / p", "make it code / a note (markdown) / a prompt (n: a note too)"),
        ("c / x", "copy / cut the cell (a cut goes to the trash)"),
        ("v / Shift+V", "paste below / above"), ("Shift+M", "merge with the cell below"),
        ("d d", "delete (to the trash)"), ("z", "undo the last delete"),
        ("h", "hide from the model / show"), ("i i", "interrupt: stop the running cell"),
        ("Shift+I", "pin (never trimmed from the context); Jupyter has no pin"),
        ("f", "fold / unfold"), ("e", "mark exported / not"),
        ("s", "save: nothing to do, every change is stored as you make it"), ("?", "this help")]),
    ("Edit mode (typing in a cell)", [
        ("Esc", "save and go back to command mode"), ("Shift+Enter", "save, run, select the next cell"),
        ("Ctrl+Enter", "save and run in place"), ("Alt+Enter", "save, run, add a code cell below"),
        ("Ctrl+Shift+Minus", "split the cell at the cursor"), ("Ctrl+S", "save")]),
    ("Editing a model's answer", [
        ("Esc", "save the answer (Cancel throws the edit away)"),
        ("Shift+Enter / Ctrl+Enter / Ctrl+S", "save the answer")]),
]


def help_dialog() -> Any:
    return Dialog(Div(H3("Keyboard"),
                      *[Div(H3(title, cls="small-h"),
                            Table(*[Tr(Td(Code(k)), Td(v)) for k, v in rows], cls="keys"))
                        for title, rows in HELP],
                      Button("Close", data_act="close-help", type="button", cls="secondary"),
                      cls="help-body"),
                  id="help", aria_label="Keyboard shortcuts")


def dialogue_page(d: Dialogue, models: list[tuple[str, str]], kernel_status: str,
                  running: set[str], live: dict[str, LiveState] | None = None, *,
                  adapters: "AdapterView | None" = None, run_all: Any = None,
                  kernels: tuple[dict[str, str], str] = ({}, "Python 3 (dialogue)"),
                  gateway_kernels: dict[str, str] | None = None, folder: str = "", folder_notes: Iterable[Any] = ()) -> tuple:
    """`adapters`: the dialogue's adapter set as the picker shows it; `run_all`: the progress of a
    Run all in flight (see `run_all_control`); `kernels`: the installed kernelspecs {name:
    display name} and the label of the dialogue's kernel (see `kernel_picker`), and
    `gateway_kernels` the configured gateway's; `folder`: the
    path of its folder, `folder_notes` the notes sent first (`service.folder_context`)."""
    live = live or {}
    cells = [cell(d.id, m, running=m.id in running, live=live.get(m.id)) for m in d.messages]
    return (Title(f"{d.name} · dialogue"),
            topbar(dialogue_title(d),
                   right=[model_picker(d, models),
                          adapters_control(d, adapters or AdapterView()),
                          run_all_control(d.id, run_all),
                          kernel_picker(d, *kernels, gateway=gateway_kernels),
                          kernel_badge(d.id, kernel_status), totals(d),
                          export_menu(d.id),
                          Button("?", title="Keyboard shortcuts (?)", data_act="help",
                                 cls="icon help-btn", type="button")]),
            Main(dversion_input(d),
                 folder_info(folder, list(folder_notes)) if folder else "",
                 settings_panel(d),
                 Div(*cells, id="cells", data_dialogue=d.id, cls="cells"),
                 Div(Span("Add", cls="add-label"),
                     *[Button(f"+ {label}", hx_post=urls.cells.to(did=d.id),
                              hx_vals={"kind": k}, cls="secondary small", data_act=f"append-{k}")
                       for k, label in (("code", "Code"), ("note", "Note"), ("prompt", "Prompt"))],
                     cls="addbar", id="addbar"),
                 Div(P(Small("Press ? for the keyboard shortcuts.")),
                     cls="footnote") if not d.messages else "",
                 cls="container page-dialogue", data_dialogue=d.id),
            Div(toolbar(d.id), id="tools-home", hidden=True),
            help_dialog(), Div(id="toast"), Div(id="modal"))


# ---------------------------------------------------------------- cells

KIND_LABEL = {Kind.code: "Code", Kind.note: "Note", Kind.prompt: "Prompt", Kind.raw: "Raw"}
FLAG_LABEL = {"hidden": ("hide", "Hidden from the model (h)"),
              "pinned": ("pin", "Pinned: never trimmed from the context (i)"),
              "collapsed": ("fold", "Folded (f)"),
              "exported": ("export", "Exported to the module (e)")}


def gutter(m: Message, running: bool) -> Any:
    if m.kind == Kind.code:
        n = "*" if running else (str(m.execution_count) if m.execution_count else " ")
        tag = f"[{n}]"
    else:
        tag = KIND_LABEL[m.kind]
    marks = [Span(FLAG_LABEL[f][0], cls=f"flag-mark {f}", title=FLAG_LABEL[f][1])
             for f in ("hidden", "pinned", "exported") if getattr(m, f)]
    return Div(Span(tag, cls="kind-tag"), *marks, cls="gutter", id=f"g-{m.id}")


def toolbar(did: str) -> Any:
    """The cell toolbar: one per page, moved by app.js into the cell under the mouse or the
    selected one (1,000 cells with a toolbar each would be 30,000 more elements). Its requests name
    a path relative to the cell ("run", "flag", ...), which app.js completes with the cell's URL in
    `htmx:configRequest`; the cell's own hx-include and hx-sync apply, as for any element in it."""
    tgt = dict(hx_target="closest .cell", hx_swap="outerHTML")
    run = Button(Span("▶ Run", cls="for-code"), Span("▶ Send", cls="for-prompt"),
                 Span("✓ Done", cls="for-note"), hx_post="run", data_act="run", cls="tb run",
                 title="Run (Ctrl+Enter; Shift+Enter runs and moves on)", **tgt)
    kind = Select(*[Option(KIND_LABEL[k], value=k.value) for k in (Kind.code, Kind.note, Kind.prompt)],
                  Option("Raw", value="raw", disabled=True, hidden=True),
                  name="kind", hx_post="kind", hx_trigger="change", data_act="kind",
                  cls="tb kind", aria_label="Kind of cell", **tgt)
    flags = [Button(FLAG_LABEL[f][0], hx_post="flag", hx_vals={"flag": f}, data_act=f"flag-{f}",
                    data_flag=f, aria_pressed="false", title=FLAG_LABEL[f][1], cls="tb flag", **tgt)
             for f in ("hidden", "pinned", "collapsed", "exported")]
    move = [Button("↑", hx_post="move", hx_vals={"by": -1}, hx_swap="none", data_act="up",
                   cls="tb", title="Move up (Shift+K)"),
            Button("↓", hx_post="move", hx_vals={"by": 1}, hx_swap="none", data_act="down",
                   cls="tb", title="Move down (Shift+J)")]
    adds = []
    for where, swap in (("above", "before"), ("below", "after")):
        for k in ("code", "note", "prompt"):
            # hx-include="this": only the button's values, not the cell's editor and kind
            adds.append(Li(Button(f"Add {k} {where}", hx_post=urls.cells.to(did=did), hx_vals={"kind": k},
                                  data_where=swap, hx_include="this", data_act=f"add-{k}-{where}",
                                  cls="menu-item")))
    menu = Details(Summary("⋯", cls="tb", title="More"),
                   Ul(*adds,
                      Li(Button("History…", hx_get="history", hx_target="#modal",
                                data_act="history", cls="menu-item")),
                      Li(Button("Fork from here", hx_post="fork", data_act="fork",
                                hx_include="this", cls="menu-item",
                                title="A new dialogue with the cells up to this one")),
                      Li(Button("Delete", hx_post="delete", data_act="delete",
                                cls="menu-item danger", **tgt))),
                   cls="menu cell-menu")
    return Div(run, kind, *flags, *move, menu, cls="tools", id="tools")


def _source_view(m: Message) -> Any:
    src = m.source
    if not src.strip():
        hint = {Kind.code: "Empty code cell", Kind.note: "Empty note",
                Kind.prompt: "Empty prompt", Kind.raw: "Empty raw cell"}[m.kind]
        return Div(Span(f"{hint}: press Enter or click to write.", cls="placeholder"),
                   cls="view")
    if m.collapsed:
        first = src.strip().splitlines()[0]
        more = len(src.strip().splitlines()) - 1
        return Div(Span(first[:200], cls="folded-line"),
                   Small(f" … {more} more line{'s' if more != 1 else ''}" if more else " …",
                         cls="folded-more"), cls="view folded")
    if m.kind == Kind.code:
        body = NotStr(highlight_code(src, "python"))
    elif m.kind == Kind.raw:
        body = Pre(src, cls="raw")
    else:
        body = NotStr(render_markdown(src, m.attachments))
    return Div(body, cls="view markdown" if m.kind in (Kind.note, Kind.prompt) else "view")


EDIT_HINT = {Kind.code: "Shift+Enter run · Ctrl+Enter run in place · Esc done",
             Kind.prompt: "Shift+Enter send · Ctrl+Enter send in place · Esc done",
             Kind.note: "Shift+Enter or Esc: done", Kind.raw: "Esc: done"}


def _editor(m: Message, text: str | None = None) -> Any:
    mode = "python" if m.kind == Kind.code else "markdown" if m.kind in (Kind.note, Kind.prompt) \
        else "text"
    src = m.source if text is None else text
    parts = [Textarea(_ta(src), name="source", cls="editor", data_mode=mode,
                      rows=str(max(2, min(30, src.count("\n") + 1))),
                      aria_label=f"{KIND_LABEL[m.kind]} source", spellcheck="false")]
    if m.kind == Kind.prompt:
        parts.append(Input(name="prefill", placeholder="Answer starts with… (optional prefill)",
                           autocomplete="off", cls="prefill", aria_label="Prefill"))
        # what the prompt would send: app.js fills it when the editor opens and typing pauses
        parts.append(Small("", cls="estimate", aria_live="polite",
                           title="Tokens this prompt would send now, and how many are cached"))
    if m.kind in (Kind.note, Kind.prompt):
        # no name: the cell's other requests (hx-include) never carry it; app.js uploads the
        # files to the images route (so do a paste and a drop into the editor)
        parts.append(Label("Add image…", Input(type="file", accept=",".join(IMAGE_TYPES),
                                               multiple=True, data_act="image-file", hidden=True),
                           cls="image-pick small", title="Or paste (Ctrl+V) or drop images "
                           "into the editor: PNG, JPEG, GIF or WebP, at most 5 MiB each"))
    return Div(*parts, cls="editor-wrap", data_hint=EDIT_HINT[m.kind])


IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


# Rendered cells by (dialogue, message, version): a version changes with every stored change of a
# message, so an entry never goes stale, and reopening a long dialogue re-renders only what
# changed. Cells in a transient state (running, in conflict, new) are not cached.
_CELL_CACHE: OrderedDict[tuple, Safe] = OrderedDict()
CELL_CACHE_SIZE = 8192


def cell(did: str, m: Message, *, running: bool = False, live: LiveState | None = None,
         editing: bool = False, new: bool = False, conflict: dict | None = None) -> Safe:
    """One message, as HTML. `conflict` (keys: mine, message) shows a refused save: the user's
    text stays in the editor, next to what is stored now."""
    cacheable = not (running or live or editing or new or conflict)
    key = (did, m.id, m.version, m.updated)
    if cacheable and key in _CELL_CACHE:
        _CELL_CACHE.move_to_end(key)
        return _CELL_CACHE[key]
    html_ = Safe(to_xml(_cell(did, m, running=running, live=live, editing=editing, new=new,
                              conflict=conflict)))
    if cacheable:
        _CELL_CACHE[key] = html_
        if len(_CELL_CACHE) > CELL_CACHE_SIZE:
            _CELL_CACHE.popitem(last=False)
    return html_


def _cell(did: str, m: Message, *, running: bool = False, live: LiveState | None = None,
          editing: bool = False, new: bool = False, conflict: dict | None = None) -> Any:
    classes = ["cell", f"kind-{m.kind.value}"] + [f"is-{f}" for f in
                                                  ("hidden", "pinned", "collapsed", "exported")
                                                  if getattr(m, f)]
    # a refused save keeps what the user typed: the source in the cell's editor (left open), an
    # answer in the conflict box (the result beside it may be a run another tab started)
    mine = conflict.get("mine") if conflict else None
    answer = conflict.get("answer") if conflict else None
    if editing or (conflict and (mine is not None or answer is None)):
        classes.append("editing")
    banner = ""
    if conflict:
        stored = []
        if answer is None or mine is not None:
            stored.append(Details(Summary("What is stored now"), Pre(m.source, cls="theirs")))
        draft = ""
        if answer is not None:
            stored.append(Details(Summary("The answer stored now"),
                                  Pre(m.response or "(no answer)", cls="theirs")))
            draft = Div(Small("Your answer, not saved:"),
                        Textarea(_ta(answer), name="response", cls="editor answer-editor",
                                 data_mode="markdown", aria_label="Your answer",
                                 rows=str(max(3, min(30, answer.count("\n") + 2)))),
                        cls="conflict-answer")
        banner = Div(Strong("Not saved: "), conflict["message"], *stored, draft,
                     Div(Button("Save mine over it", hx_post=urls.save.to(did=did, mid=m.id),
                                hx_target=f"#m-{m.id}", hx_swap="outerHTML", cls="small",
                                # the answer editor's keys (Ctrl+S, Shift+Enter) press this
                                data_act="keep-mine" if answer is None else "save-answer"),
                         Button("Discard mine, reload", hx_get=urls.cell.to(did=did, mid=m.id),
                                hx_target=f"#m-{m.id}", hx_swap="outerHTML",
                                cls="secondary small", data_act="reload"), cls="row"),
                     cls="conflict", role="alert")
    return Div(
        gutter(m, running),
        Div(Div(_source_view(m), _editor(m, mine), cls="src"),
            banner,
            result(did, m, running=running, live=live),
            cls="cell-main"),
        version_input(m),
        id=f"m-{m.id}", cls=" ".join(classes), data_id=m.id, data_kind=m.kind.value,
        data_new="1" if new else None, data_url=urls.cell.to(did=did, mid=m.id), tabindex="-1",
        hx_include="this",
        hx_sync="this:queue all")


# ---------------------------------------------------------------- results

def _iframe_output(markup: str) -> Any:
    """An HTML output of code (a DataFrame, a widget's static view), isolated: sandbox="" gives the
    frame a unique origin and no scripts, forms, popups or top navigation, and the page's CSP
    (inherited by srcdoc frames) blocks any network load it tries."""
    rows = len(re.findall(r"<(?:tr|li)\b", markup, re.I))
    lines = len(re.findall(r"<(?:br|p|h[1-6]|div|pre)\b", markup, re.I)) + markup.count("\n") // 3 + 1
    height = max(40, min(640, 23 * rows + 20 * lines + 16))
    doc = ("<!doctype html><html><head><meta charset='utf-8'><style>"
           "body{font:14px/1.4 system-ui,sans-serif;margin:6px;color:#222}"
           "table{border-collapse:collapse;font-size:13px}"
           "th,td{border:1px solid #ddd;padding:2px 8px;text-align:right}"
           "th{background:#f4f6f8}</style></head><body>" + markup + "</body></html>")
    return Iframe(srcdoc=doc, sandbox="", cls="output html-frame", style=f"height:{height}px",
                  title="HTML output", loading="lazy")


def output_fragment(o: dict[str, Any]) -> Any:
    t = o.get("output_type")
    if t in ("execute_result", "display_data") and pick_mime(o.get("data") or {}) == "text/html":
        v = o["data"]["text/html"]
        return _iframe_output("".join(v) if isinstance(v, list) else str(v))
    return NotStr(render_output(o, live=True))


def stream_update(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The HTML replacing the last line of a running cell's stream output that went from `old`
    to `new` (None: show the whole output again)."""
    return stream_update_html(str(old.get("text", "")), str(new.get("text", "")))


def outputs_html(outputs: list[dict[str, Any]]) -> list[Any]:
    """Consecutive writes to one stream show as one block, as in Jupyter."""
    return [output_fragment(o) for o in merge_streams(outputs)
            if o.get("output_type") not in ("clear_output", "update_display_data")]


def frag(*parts: Any) -> str:
    """HTML of FT components, NotStr and lists of them (fastcore's to_xml refuses a bare NotStr
    in a list)."""
    out: list[str] = []
    for p in parts:
        if isinstance(p, (list, tuple)):
            out.append(frag(*p))
        elif isinstance(p, NotStr):
            out.append(str(p))
        elif isinstance(p, str):
            out.append(html.escape(p))
        else:
            out.append(to_xml(p))
    return "".join(out)


def text_chunk(text: str) -> str:
    """A piece of a streaming answer, escaped, for an SSE swap."""
    return f"<span>{html.escape(text)}</span>"


def input_box(did: str, mid: str, question: dict[str, Any] | None) -> Any:
    """The line a cell's input() or getpass() waits for, asked under its output; empty when it
    waits for none. A password is typed into a password field and never shown."""
    if not question:
        return ""
    prompt = str(question.get("prompt") or "")
    return Form(Label(Span(prompt or "Input", cls="stdin-prompt"),
                      Input(type="password" if question.get("password") else "text",
                            name="value", autocomplete="off", autofocus=True, cls="stdin-value",
                            aria_label=prompt or "Input requested by the cell")),
                Button("Send", type="submit", cls="small"),
                hx_post=urls.cell_input.to(did=did, mid=mid), hx_swap="none",
                hx_disabled_elt="find button", cls="stdin", data_act="stdin")


def error_box(message: str) -> Any:
    return Div(message, cls="run-error", role="alert")


def _tool_name(c: dict[str, Any]) -> str | None:
    """A call's tool name for the page's attributes: only a name the APIs accept (letters,
    digits, _ . -); a model may write anything in a call, and that stays in the escaped text."""
    name = str(c.get("name", ""))
    return name if re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name) else None


def tool_calls_html(calls: list[dict[str, Any]]) -> list[Any]:
    """Each tool call of an answer, folded (its name and arguments in the summary; opened: the
    arguments in full and what went back to the model). Every string is escaped."""
    out = []
    for c in calls:
        args = json.dumps(c.get("arguments", {}), ensure_ascii=False)
        res = c.get("result")
        chip = "denied" if c.get("denied") or str(res or "").startswith(("denied", "not run")) \
            else "tool"
        out.append(Details(Summary(Span(chip, cls="tool-chip" + (" denied" if chip != "tool" else "")),
                                   Code(f"{c.get('name', '?')}({args[:120]})")),
                           Pre(json.dumps(c.get("arguments", {}), ensure_ascii=False, indent=2),
                               cls="tool-args"),
                           Pre(str(res) if res is not None else "(running…)",
                               cls="tool-result" + (" error" if c.get("error") else "")),
                           cls="tool-call", data_tool=_tool_name(c)))
    return out


def approval_box(did: str, mid: str, pending: list[dict[str, Any]]) -> list[Any]:
    """The tool calls a running answer waits on the user for: what the model wants to do (the
    tool's preview: a diff for an edit, the code for a run; else its name and arguments) and
    Allow once / Always allow this tool in this dialogue / Deny. All of it escaped."""
    out = []
    for p in pending:
        name, call = str(p.get("name", "?")), str(p.get("id", ""))
        pv = p.get("preview") if isinstance(p.get("preview"), dict) else None
        kind = str(pv.get("kind", "")) if pv else ""
        if pv and kind == "diff":
            body = diff_pre(str(pv.get("text", "")))
        elif pv and kind == "code":
            body = Pre(Code(str(pv.get("text", ""))), cls="approval-code")
        else:
            body = Pre(json.dumps(p.get("arguments", {}), ensure_ascii=False, indent=2),
                       cls="tool-args")
            if pv and pv.get("text"):
                body = Div(Pre(str(pv["text"]), cls="approval-preview"), body)
        where = str(p.get("source") or "")

        def choice(label: str, decision: str, style: str) -> Any:
            return Button(label, hx_post=urls.cell_approve.to(did=did, mid=mid),
                          hx_vals={"call": call, "decision": decision},
                          hx_swap="none", hx_disabled_elt="this",
                          data_act=f"approve-{decision}", cls=f"small {style}")

        out.append(Div(
            P(Strong("The model wants to call "), Code(name),
              Small(f" ({where})" if where else "", cls="muted")),
            body,
            Div(choice("Allow once", "once", ""),
                choice("Always allow this tool in this dialogue", "always", "secondary"),
                choice("Deny", "deny", "secondary outline"), cls="approval-actions"),
            cls="approval", role="alert", data_call=call))
    return out


def usage_line(m: Message) -> Any:
    u = m.usage or {}
    if not u:
        return ""
    bits = [f"{int(u.get('input') or 0) + int(u.get('cache_read') or 0) + int(u.get('cache_write') or 0):,} in",
            f"{int(u.get('output') or 0):,} out"]
    if u.get("cache_read"):
        bits.append(f"{int(u['cache_read']):,} cached")
    bits.append(_money(u.get("cost")))
    if u.get("model"):
        bits.append(str(u["model"]))
    stop = u.get("stop_reason")
    if stop and stop not in ("end", "stop"):
        bits.append({"cancelled": "stopped", "max_tokens": "cut at max tokens",
                     "repetition": "stopped: it repeated itself"}.get(stop, stop))
    # what the model did not see in full: said here, where the answer is read
    cut = m.meta.get("cut") or []
    if cut:
        lines = sum(int(c.get("cut_lines") or 0) for c in cut if isinstance(c, dict))
        bits.append(f"long output of {len(cut)} code cell{'s' if len(cut) != 1 else ''} shortened "
                    f"for the model ({lines:,} lines cut)")
    if m.meta.get("dropped"):
        bits.append(f"{int(m.meta['dropped'])} earlier message(s) left out to fit the context")
    return Small(" · ".join(bits), cls="usage")


def steps_view(steps: list[Any]) -> Any:
    """A long step's progress (the service's `Step`s, one per task): a bar where the amount is
    known, a busy bar where it is not, and the same words as the terminal."""
    rows = []
    for s in steps:
        bar = (Progress_(value=f"{s.fraction:.3f}", max="1") if s.fraction is not None
               else Progress_())  # no value: the browser's indeterminate bar
        rows.append(Div(bar, Small(s.describe()), cls="step" + (" finished" if s.finished else "")))
    return Div(*rows, cls="steps-list")


def read_progress(mid: str, progress: dict[str, Any] | None) -> Any:
    """How far the model has read a long prompt (a bar and words), or an empty placeholder
    once the answer has started: the target the page's "progress" events replace."""
    if not progress:
        return Div(id=f"p-{mid}", cls="read-progress", hidden=True)
    from ..service import Progress
    p = Progress(int(progress.get("read") or 0), int(progress.get("total") or 0),
                 progress.get("eta_s"), str(progress.get("task") or ""))
    return Div(Progress_(value=str(p.read), max=str(max(p.total, 1))),
               Span(p.describe(), cls="read-progress-text"),
               id=f"p-{mid}", cls="read-progress", role="status")


def live_body(did: str, m: Message, live: LiveState) -> list[Any]:
    """The inside of a running message's live area: what it produced so far."""
    if m.kind == Kind.code:
        return [Div(*outputs_html(live.outputs), id=f"o-{m.id}", cls="outputs"),
                Div(input_box(did, m.id, live.input) if live.input else "", id=f"i-{m.id}"),
                Div(*[error_box(e) for e in live.errors], id=f"e-{m.id}")]
    return [read_progress(m.id, live.progress),
            Div(*tool_calls_html(live.tool_calls), id=f"t-{m.id}", cls="tools-calls"),
            Div(*approval_box(did, m.id, live.pending), id=f"ap-{m.id}", cls="approvals"),
            Div(NotStr(text_chunk(live.text)) if live.text else "", id=f"a-{m.id}",
                cls="answer streaming"),
            Div(*[error_box(e) for e in live.errors], id=f"e-{m.id}")]


def doc_change(did: str, op: str, mid: str, m: Message | None, after: str | None, *,
               live: LiveState | None = None) -> list[Any]:
    """What the page swaps in when the model's document tools change message `mid` (`op`: add,
    edit, delete, move, run): the cell as stored now (running, with its own stream, for a run),
    out of band; an added or moved one goes after message `after` (None: at the top)."""
    # data-doc (on the cell, or on a hidden marker app.js takes out) lets the page keep a cell
    # the user is editing: its save then meets the model's version as a conflict, with the
    # user's text kept
    def marker() -> Any:
        return Span(data_doc=op, data_id=mid, hidden=True)

    if op == "delete" or m is None:
        return [Div(marker(), id=f"m-{mid}", hx_swap_oob="delete", data_doc="delete",
                    data_id=mid)]
    if op in ("edit", "run"):
        el = _cell(did, m, running=op == "run", live=live)
        el.attrs["hx-swap-oob"] = "true"
        el.attrs["data-doc"] = op
        return [el]
    place = f"afterend:#m-{after}" if after else "afterbegin:#cells"
    out = [Div(marker(), id=f"m-{mid}", hx_swap_oob="delete", data_doc=op, data_id=mid)] \
        if op == "move" else []
    return out + [Div(marker(), cell(did, m), hx_swap_oob=place)]


def result(did: str, m: Message, *, running: bool = False, live: LiveState | None = None,
           oob_extra: Iterable[Any] = ()) -> Any:
    """What a message produced. While it runs, this element holds the event stream: SSE
    messages append text and outputs, and the final `done` replaces the whole element."""
    rid = f"r-{m.id}"
    if running:
        live = live or LiveState.from_message(m)
        sinks = [Div(sse_swap="snapshot", hx_target=f"#live-{m.id}", hx_swap="innerHTML", hidden=True),
                 Div(sse_swap="output", hx_target=f"#o-{m.id}", hx_swap="beforeend", hidden=True),
                 # a stream chunk joined to the output before it (its \r may rewrite that line):
                 # the output's last line again and what follows it, or the whole output
                 Div(sse_swap="output-tail", hx_target=f"#o-{m.id} > :last-child .open-line",
                     hx_swap="outerHTML", hidden=True),
                 Div(sse_swap="output-last", hx_target=f"#o-{m.id} > :last-child", hx_swap="outerHTML",
                     hidden=True),
                 Div(sse_swap="outputs", hx_target=f"#o-{m.id}", hx_swap="innerHTML", hidden=True),
                 Div(sse_swap="text", hx_target=f"#a-{m.id}", hx_swap="beforeend", hidden=True),
                 Div(sse_swap="progress", hx_target=f"#p-{m.id}", hx_swap="outerHTML", hidden=True),
                 Div(sse_swap="tools", hx_target=f"#t-{m.id}", hx_swap="innerHTML", hidden=True),
                 Div(sse_swap="approval", hx_target=f"#ap-{m.id}", hx_swap="innerHTML", hidden=True),
                 # the answer's document tools changed other messages: out-of-band cells
                 Div(sse_swap="doc", hx_swap="innerHTML", hidden=True),
                 Div(sse_swap="input", hx_target=f"#i-{m.id}", hx_swap="innerHTML", hidden=True),
                 # "run-error", not "error": that name is EventSource's own event for a lost
                 # connection, which would swap `undefined` into the cell
                 Div(sse_swap="run-error", hx_target=f"#e-{m.id}", hx_swap="beforeend", hidden=True),
                 Div(sse_swap="done", hx_target=f"#{rid}", hx_swap="outerHTML", hidden=True)]
        return Div(Div(*live_body(did, m, live), id=f"live-{m.id}", cls="live"),
                   Div(Span(cls="spinner"), Span("running…" if m.kind == Kind.code else "answering…"),
                       Button("■ Stop", hx_post=urls.stop_cell.to(did=did, mid=m.id), hx_swap="none", data_act="stop",
                              hx_disabled_elt="this",  # one Stop at a time; the run's end says how
                              title=("Interrupt the cell; if it is still running a few seconds "
                                     "later, restart its kernel" if m.kind == Kind.code else
                                     "End the answer here"),
                              cls="secondary small stop"), cls="run-status"),
                   *sinks, *oob_extra,
                   id=rid, cls="result running", hx_ext="sse", sse_connect=urls.cell_stream.to(did=did, mid=m.id),
                   sse_close="close")
    parts: list[Any] = []
    if m.kind == Kind.code:
        if m.outputs and not m.collapsed:
            parts.append(Div(*outputs_html(m.outputs), cls="outputs"))
        elif m.outputs:
            parts.append(Small(f"{len(m.outputs)} output{'s' if len(m.outputs) != 1 else ''} folded",
                               cls="folded-more"))
        st = m.meta.get("run", {}).get("status")
        # interrupted: the process running it died mid-run (store.recover_interrupted); said
        # even under an error output, which may be one the cell printed and went on from
        cut = bool(m.meta.get("interrupted"))
        if st and st not in ("ok",) and (cut or not any(o.get("output_type") == "error"
                                                        for o in m.outputs)):
            msg = m.meta.get("run", {}).get("message") or st
            parts.append(error_box(f"{st}: {msg}" if msg != st else st))
        elif cut:
            parts.append(Small("This run was cut off: the process running it stopped.", cls="warn"))
    elif m.kind == Kind.prompt:
        if m.tool_calls and not m.collapsed:
            parts.append(Div(*tool_calls_html(m.tool_calls), cls="tools-calls"))
        if m.response or m.usage:
            answer = (Div(NotStr(render_markdown(m.response)), cls="answer markdown")
                      if not m.collapsed else
                      Small(f"answer folded ({len(m.response):,} characters)", cls="folded-more"))
            parts.append(Div(
                answer,
                Div(id=f"ae-{m.id}", cls="answer-edit"),
                Div(usage_line(m),
                    Button("Edit answer", hx_get=urls.answer.to(did=did, mid=m.id), hx_target=f"#ae-{m.id}",
                           data_act="edit-answer", cls="link small"),
                    Button("Replay", hx_post=urls.replay.to(did=did, mid=m.id), hx_target=f"#rp-{m.id}",
                           hx_indicator=f"#rp-{m.id}", hx_disabled_elt="this", data_act="replay",
                           cls="link small",
                           title="Answer again under the settings this answer recorded (model, "
                                 "adapters, sampling, seed) and show any difference; stores nothing"),
                    cls="answer-foot"),
                Div(Small("replaying…", cls="htmx-indicator"), id=f"rp-{m.id}", cls="replay"),
                request_toggle(did, m),
                cls="answer-box"))
        if m.meta.get("error"):
            parts.append(error_box(str(m.meta["error"])))
        if m.meta.get("interrupted"):
            parts.append(Small("This answer was cut off: the process writing it stopped before "
                               "it finished.", cls="warn"))
    return Div(*parts, *oob_extra, id=rid, cls="result")


def request_toggle(did: str, m: Message) -> Any:
    """The answer's "Request" toggle: the exact request it was sent with (routes/requests.py),
    fetched the first time it is opened (a long dialogue would otherwise carry every request)."""
    return Details(Summary("Request", title="What was sent for this answer: system prompt, "
                           "context, each message as the model saw it, tools, cache breakpoints, "
                           "tokens"),
                   Div(Small("loading…"), id=f"rq-{m.id}"), cls="request-toggle",
                   hx_get=urls.request_panel.to(did=did, mid=m.id), hx_trigger="toggle once",
                   hx_target=f"#rq-{m.id}", hx_swap="innerHTML")


def answer_editor(did: str, m: Message) -> Any:
    """The editor for a model's answer, fetched when the user asks to edit it (a long dialogue
    would otherwise carry every answer twice)."""
    return Div(Textarea(_ta(m.response), name="response", cls="editor answer-editor",
                        data_mode="markdown", aria_label="Answer",
                        rows=str(max(3, min(30, m.response.count("\n") + 2)))),
               Div(Button("Save answer", hx_post=urls.save.to(did=did, mid=m.id), hx_target=f"#m-{m.id}",
                          hx_swap="outerHTML", cls="small", data_act="save-answer"),
                   Button("Cancel", type="button", data_act="cancel-answer",
                          cls="secondary small"), cls="row"),
               cls="answer-edit-body")


# ---------------------------------------------------------------- history

def _who(v: Any) -> str:
    from ..service import DialogueService
    return DialogueService.who(v)


def _history_note(steps: list[Any]) -> str:
    from ..service import DialogueService
    return DialogueService.history_note([v for st in steps for v in st.versions])


def history_modal(did: str, m: Message, steps: list[Any]) -> Any:
    """A message's history as steps (`history.Step`: an edit with its run and result), newest
    first: what happened, the diff of the source against the step before, what it produced, and
    Restore (its source with its own outputs). Every version stays listed under each step."""
    rows = []
    for st in reversed(steps):
        state = st.state
        current = any(v.version == m.version for v in st.versions)
        flags = [f for f in ("hidden", "pinned", "collapsed", "exported") if state.get(f)]
        if st.diff:
            body = diff_pre(st.diff)
        else:
            src = st.source
            body = Pre(src[:600] + ("…" if len(src) > 600 else ""), cls="hist-src")
        detail = []
        if st.ran and (ans := state.get("response") or ""):
            detail.append(Div(Small("answer: "), (ans[:300] + ("…" if len(ans) > 300 else "")),
                              cls="hist-answer"))
        outs = state.get("outputs") or []
        if st.ran and isinstance(outs, list) and outs:
            detail.append(Small(f"{len(outs)} output{'s' if len(outs) != 1 else ''}"))
        versions = Details(Summary(Small(f"{len(st.versions)} version"
                                         f"{'s' * (len(st.versions) != 1)}")),
                           Ul(*[Li(Small(f"v{v.version} {v.op} · {_who(v)} · {_when(v.at)}"))
                                for v in st.versions], cls="hist-versions"))
        rows.append(Li(
            Div(Strong(f"Step {st.number}"), Small(st.versions_text()),
                Span(st.summary(), cls="op"), Small(_when(st.at)),
                Span(st.kind, cls="kind-chip"),
                *[Span(f, cls="flag-mark") for f in flags],
                Span("current", cls="current") if current else
                Button("Restore", hx_post=urls.restore_version.to(did=did, mid=m.id),
                       hx_vals={"to": st.last, "version": m.version},
                       hx_target=f"#m-{m.id}", hx_swap="outerHTML", cls="small",
                       data_act="restore-version",
                       title="Make this step's source current again, with its own outputs"),
                cls="hist-head"),
            body, *detail, versions, cls="hist-item"))
    n = sum(len(st.versions) for st in steps)
    return Dialog(Div(Header(H3(f"History of this {KIND_LABEL[m.kind].lower()}"),
                             Button("×", data_act="close-modal", cls="icon", type="button",
                                    aria_label="Close")),
                      P(f"{len(steps)} step{'s' * (len(steps) != 1)} ({n} versions), newest first: "
                        "an edit and its run are one step, shown as a diff from the step before. "
                        "Restoring brings a step's source back with its own outputs, as a new "
                        "version; nothing is erased.", cls="hint"),
                      P(note, cls="hint move-note") if (note := _history_note(steps)) else "",
                      Ul(*rows, cls="history"), cls="modal-body"),
                  open=True, id="history", cls="modal")


def diff_pre(diff: str, cls: str = "hist-diff") -> Any:
    """A unified diff as lines classed by what they are (file, hunk, added, removed, context)."""
    return Pre(*[Span(line + "\n", cls=_diff_class(line)) for line in diff.splitlines()], cls=cls)


def _diff_class(line: str) -> str:
    if line.startswith(("---", "+++")):
        return "diff-file"
    if line.startswith("@@"):
        return "diff-hunk"
    return {"+": "diff-add", "-": "diff-del"}.get(line[:1], "diff-ctx")


# ---------------------------------------------------------------- SSE

def sse(event: str, data: str = "") -> str:
    """One Server-Sent Event. EventSource splits data on CR, LF and CRLF alike and joins the
    `data:` lines with LF, so every line break becomes its own `data:` line. (FastHTML's
    `sse_message` uses str.splitlines, which also splits on form feeds and Unicode separators and
    drops a trailing newline, which would change a streamed answer.)"""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return f"event: {event}\n" + "".join(f"data: {ln}\n" for ln in lines) + "\n"


# ---------------------------------------------------------------- adapters

def _short(name: str) -> str:
    """A set entry as shown: a registered name as is, a .gguf path by its file name."""
    return name.replace("\\", "/").rsplit("/", 1)[-1] if ("/" in name or "\\" in name) else name


def _bytes(n: int | None) -> str:
    if not n:
        return ""
    for unit, k in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def adapter_origin(prov: dict[str, Any] | None) -> str:
    """One line on what an adapter came from, out of the provenance the registry keeps (the
    trainer's GGUF metadata, a sidecar training record, a merge's parents, a Hub repository)."""
    prov = prov or {}
    train = prov.get("training") if isinstance(prov.get("training"), dict) else {}
    on = prov.get("trained_on") or train.get("trained_on") or train.get("sources")
    if on:
        names = prov.get("dialogues") or train.get("dialogues")
        return f"trained on {on}" + (f" ({names})" if names and names != on else "")
    merge = prov.get("merge")
    if isinstance(merge, dict):
        parents = ", ".join(str(p.get("file", "?")) for p in merge.get("parents", []) if isinstance(p, dict))
        return f"{merge.get('method', 'merge')} merge of {parents}" if parents else "a merge"
    if prov.get("parents"):
        return f"merge of {prov['parents']}"
    if prov.get("repo"):
        return f"from {prov['repo']}"
    if prov.get("converted_from"):
        return f"converted from {_short(str(prov['converted_from']))}"
    return ""


def adapter_badges(adapters: dict[str, Any], *, inactive: bool = False,
                   problems: dict[str, str] | None = None) -> Any:
    """The set as compact badges, name ×scale: a scale of 0 shows as off, an entry that cannot be
    applied as broken. `inactive`: the model is not local, so none of them applies."""
    problems = problems or {}
    out = []
    for name, scale in adapters.items():
        s = float(scale)
        cls = ["adapter-badge"] + (["off"] if s == 0 else []) + (["broken"] if name in problems else [])
        why = " (off)" if s == 0 else ""
        if name in problems:
            why += f": {problems[name]}"
        out.append(Span(_short(name), Small(f"×{s:g}"), cls=" ".join(cls), data_adapter=name,
                        title=f"{name} at scale {s:g}{why}"))
    return Span(*out, cls="adapter-badges" + (" inactive" if inactive else ""))


def _adapter_row(prefix: str, name: str, on: bool, scale: float, detail: str, *,
                 broken: bool = False) -> Any:
    # The range is a hint for the spinner, not a limit: a stored scale outside it (set from the
    # CLI or Python) widens it, so the browser's form validation never refuses a saved set.
    lo, hi = min(0.0, scale), max(2.0, scale)
    step = "0.05" if abs(scale * 20 - round(scale * 20)) < 1e-9 else "any"
    return Div(Label(Input(type="checkbox", name=f"{prefix}-on", value=name, checked=on),
                     Span(_short(name), cls="adapter-name", title=name)),
               Input(type="number", name=f"{prefix}-scale:{name}", value=f"{scale:g}",
                     min=f"{lo:g}", max=f"{hi:g}", step=step, cls="adapter-scale",
                     aria_label=f"Scale of {name}"),
               Small(detail, cls="adapter-detail"),
               cls="adapter-row" + (" broken" if broken else ""), data_adapter=name)


def adapter_rows(prefix: str, current: dict[str, Any], view: AdapterView, *,
                 keep_broken: bool = True) -> list[Any]:
    """One row per adapter that fits (checkbox: in the set; number: its scale), then the entries
    of `current` that are not among them (a .gguf path, or broken: shown so they can be removed).
    `keep_broken`: a broken entry starts checked (the dialogue's editor: saving never drops it
    silently) or unchecked (a trial's set, which could not run with it)."""
    rows = []
    names = set()
    for c in view.choices:
        names.add(c.name)
        rank = c.rank if isinstance(c.rank, int) else "/".join(str(r) for r in c.rank)
        detail = " · ".join(x for x in (f"rank {rank}", _bytes(c.size), adapter_origin(c.provenance)) if x)
        rows.append(_adapter_row(prefix, c.name, c.name in current, float(current.get(c.name, 1.0)), detail))
    for name, scale in current.items():
        if name in names:
            continue
        problem = view.problems.get(name, "")
        rows.append(_adapter_row(prefix, name, keep_broken or not problem, float(scale),
                                 f"⚠ {problem}: uncheck to remove it" if problem else "a .gguf file",
                                 broken=bool(problem)))
    if not rows:
        rows.append(P("No adapter is registered for this model: add one with ",
                      Code("dialogue adapters add FILE"), " or train one with ",
                      Code("dialogue train"), ".", cls="hint"))
    return rows


def adapters_control(d: Dialogue, view: AdapterView, oob: bool = False) -> Any:
    """Next to the model picker: the dialogue's adapter set as badges (always visible), an editor
    to choose it, and the side-by-side trial. For a model that is not local the set is kept but
    shown greyed, with why: the service refuses prompts with it."""
    current = dict(d.meta.get("adapters") or {})
    oob_attr = "true" if oob else None
    if not d.model.startswith(("local:", "llama-server:", "vllm:")):  # the engines apply sets too
        if not current:
            return Div(id="adapters", cls="adapters", hx_swap_oob=oob_attr)
        return Div(adapter_badges(current, inactive=True),
                   Small("adapters apply to local models only: choose a local model, or clear "
                         "them to send prompts", cls="adapter-hint"),
                   Button("Clear", hx_post=urls.adapters.to(did=d.id), hx_vals={"clear": "1"},
                          hx_include="#dversion", cls="outline secondary small",
                          data_act="clear-adapters"),
                   id="adapters", cls="adapters inactive", hx_swap_oob=oob_attr)
    summary = Summary(adapter_badges(current, problems=view.problems) if current
                      else Span("no adapters", cls="adapter-none"),
                      cls="adapter-summary", data_act="adapters-menu",
                      title="LoRA adapters applied to this dialogue's model: click to choose")
    form = Form(Div(*adapter_rows("set", current, view), cls="adapter-rows"),
                Div(Button("Save adapters", type="submit", cls="small", data_act="save-adapters"),
                    Button("None", hx_post=urls.adapters.to(did=d.id), hx_vals={"clear": "1"},
                           hx_include="#dversion", type="button", cls="secondary small",
                           data_act="clear-adapters"), cls="row"),
                hx_post=urls.adapters.to(did=d.id), hx_include="#dversion", cls="adapter-form")
    editor = Details(summary,
                     Div(P("Applied to the quantized base at run time (never merged). A scale of 0 "
                           "keeps an adapter listed but off.", cls="hint"), form,
                         cls="adapter-pop"),
                     cls="adapters-menu")
    compare = Button("Compare…", hx_get=urls.trial_dialog.to(did=d.id), hx_target="#modal",
                     cls="outline secondary small", data_act="compare",
                     title="Try one prompt under two adapter sets, side by side")
    return Div(editor, compare, id="adapters", cls="adapters", hx_swap_oob=oob_attr)


def trial_dialog(d: Dialogue, view: AdapterView, *, max_tokens: int = 256) -> Any:
    """The side-by-side trial: one prompt, two adapter sets (A: the dialogue's, B: none, the bare
    base), answered one after the other as if the prompt were added at the end of the dialogue.
    Nothing is stored unless the user keeps an answer."""
    current = dict(d.meta.get("adapters") or {})
    form = Form(
        Label("Prompt", Textarea(name="source", rows="3", required=True, cls="trial-source",
                                 placeholder="Ask something, to compare the answers…")),
        Div(Div(H3("A"), *adapter_rows("a", current, view, keep_broken=False), cls="trial-set"),
            Div(H3("B"), *adapter_rows("b", {}, view), cls="trial-set"), cls="trial-sets"),
        Div(Label("Max tokens", Input(type="number", name="max_tokens", value=str(max_tokens),
                                      min="1", max="8192", cls="trial-max")),
            Button("Compare", type="submit", cls="small", data_act="run-trial"), cls="row"),
        hx_post=urls.trials.to(did=d.id), hx_target="#trial-out", hx_swap="outerHTML",
        cls="trial-form")
    return Dialog(Div(Header(H3("Compare adapter sets"),
                             Button("×", data_act="close-modal", cls="icon", type="button",
                                    aria_label="Close")),
                      P("The prompt is answered as if it were added at the end of this dialogue, "
                        "under set A and then set B (unchecked everywhere: the base model alone). "
                        "Nothing is stored unless you keep an answer.", cls="hint"),
                      form, Div(id="trial-out", cls="trial-out"), cls="modal-body wide"),
                  open=True, id="compare", cls="modal")


def trial_column(did: str, tid: str, side: str, adapters: dict[str, Any], *,
                 result: dict[str, Any] | None = None, status: str = "") -> Any:
    """One side of a trial. While it streams (`result` None) its text arrives escaped, piece by
    piece; when it is over, the whole answer is rendered through the sanitizer, with its usage,
    time, and the buttons to keep the answer or adopt the set."""
    head = Div(Strong(side.upper()), adapter_badges(adapters) if adapters
               else Span("no adapters: the base model", cls="adapter-none"), cls="trial-head")
    if result is None:
        return Div(head, Div(id=f"trial-{side}-text", cls="answer streaming"),
                   Div(Span(cls="spinner") if status == "answering…" else "", Span(status),
                       id=f"trial-{side}-status", cls="run-status"),
                   id=f"trial-{side}", cls="trial-col", data_side=side)
    parts: list[Any] = [head]
    if result.get("text"):
        parts.append(Div(NotStr(render_markdown(result["text"])), cls="answer markdown",
                         id=f"trial-{side}-text"))
    if result.get("error"):
        parts.append(error_box(result["error"]))
    u = result.get("usage") or {}
    bits = [f"{int(u.get('input', 0)) + int(u.get('cache_read', 0)) + int(u.get('cache_write', 0)):,} in",
            f"{int(u.get('output', 0)):,} out", f"{result.get('seconds', 0):.1f} s"]
    stop = u.get("stop_reason")
    if stop and stop not in ("end", "stop"):
        bits.append({"cancelled": "stopped", "max_tokens": "cut at max tokens"}.get(stop, stop))
    foot: list[Any] = [Small(" · ".join(bits), cls="usage")]
    if result.get("text") and not result.get("error"):
        foot.append(keep_button(did, tid, side, kept=bool(result.get("kept"))))
    if not result.get("error"):
        foot.append(Button("Use this set", hx_post=urls.use_trial.to(did=did, tid=tid),
                           hx_vals={"side": side}, hx_include="#dversion",
                           cls="outline secondary small", data_act=f"use-{side}",
                           title="Make this the dialogue's adapter set"))
    parts.append(Div(*foot, cls="row trial-foot"))
    return Div(*parts, id=f"trial-{side}", cls="trial-col done", data_side=side)


def keep_button(did: str, tid: str, side: str, *, kept: bool = False, oob: bool = False) -> Any:
    if kept:
        return Span("✓ kept at the end of the dialogue", id=f"trial-{side}-keep", cls="kept",
                    hx_swap_oob="true" if oob else None)
    return Button("Keep this answer", hx_post=urls.keep_trial.to(did=did, tid=tid), hx_vals={"side": side},
                  id=f"trial-{side}-keep", cls="small", data_act=f"keep-{side}",
                  title="Add the prompt with this answer at the end of the dialogue",
                  hx_swap_oob="true" if oob else None)


def trial_out(did: str, tid: str, sets: dict[str, dict[str, Any]]) -> Any:
    """The two columns of a trial and its event stream: `text-a` / `text-b` append escaped text,
    `status-b` says B has started, `end-a` / `end-b` replace a column with its final state."""
    sinks = []
    for s in ("a", "b"):
        sinks += [Div(sse_swap=f"text-{s}", hx_target=f"#trial-{s}-text", hx_swap="beforeend", hidden=True),
                  Div(sse_swap=f"status-{s}", hx_target=f"#trial-{s}-status", hx_swap="outerHTML",
                      hidden=True),
                  Div(sse_swap=f"end-{s}", hx_target=f"#trial-{s}", hx_swap="outerHTML", hidden=True)]
    return Div(Div(trial_column(did, tid, "a", sets["a"], status="answering…"),
                   trial_column(did, tid, "b", sets["b"], status="waiting for A…"),
                   cls="trial-cols"),
               *sinks, id="trial-out", cls="trial-out", data_trial=tid, hx_ext="sse",
               sse_connect=urls.trial_stream.to(did=did, tid=tid), sse_close="close")


def trial_status(side: str, status: str) -> Any:
    return Div(Span(cls="spinner"), Span(status), id=f"trial-{side}-status", cls="run-status")


def run_all_control(did: str, progress: tuple[int, int] | None = None, oob: bool = False) -> Any:
    """The Run all button, or while a Run all is in flight its progress, a Stop, and the event
    stream that puts each cell in its running state as it starts (the cell's own stream then
    shows its outputs, as for a single run)."""
    oob_attr = "true" if oob else None
    if progress is None:
        return Div(Button("▶▶ Run all", hx_post=urls.run_all.to(did=did), hx_target="#runall",
                          hx_swap="outerHTML", cls="outline secondary small", data_act="run-all",
                          title="Run every code cell, top to bottom (stops at the first error)"),
                   id="runall", cls="runall", hx_swap_oob=oob_attr)
    return Div(Span(cls="spinner"), run_all_progress(*progress),
               Button("■", title="Stop running all", hx_post=urls.stop_all.to(did=did),
                      hx_swap="none", data_act="stop-all", cls="icon"),
               Div(sse_swap="cell", hx_swap="innerHTML", hidden=True),
               Div(sse_swap="progress", hx_target="#runall-progress", hx_swap="outerHTML", hidden=True),
               Div(sse_swap="done", hx_target="#runall", hx_swap="outerHTML", hidden=True),
               id="runall", cls="runall running", hx_ext="sse",
               sse_connect=urls.run_all_stream.to(did=did, **{"from": progress[0]}),
               sse_close="close", hx_swap_oob=oob_attr)


def run_all_progress(done: int, total: int) -> Any:
    return Span(f"running all: {done} of {total}", id="runall-progress", cls="runall-progress")
