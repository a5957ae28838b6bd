"""The dialogue list, search, new / import / rename / delete / restore, export, and a dialogue's
page."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fasthtml.common import APIRouter, Div, HTMLResponse, HtmxResponseHeaders, Redirect, Response, to_xml
from starlette.datastructures import UploadFile
from starlette.requests import Request

from ...document import Dialogue
from ...service import ConflictError, DialogueService, NameTakenError, NotFoundError, StoreError
from .. import paths
from .. import views as V
from ..common import form, opt_int, refuse, site, status_of, text
from .progress import JOBS

rt = APIRouter()


def free_name(service: DialogueService, name: str) -> str:
    """`name`, or `name (2)`, `name (3)`... if it is taken: an upload never fails on a name."""
    taken = {d["name"] for d in service.list()}
    if name not in taken:
        return name
    i = 2
    while f"{name} ({i})" in taken:
        i += 1
    return f"{name} ({i})"


def import_notice(d: Dialogue) -> Any | None:
    """The toast that says what importing `d` set aside (the service's import record), with the
    set-aside system prompt shown and a button that adopts it through the settings route; None
    when the import kept everything."""
    from fasthtml.common import Button, Details, Pre, Summary
    from ...service import import_record
    rec = import_record(d)
    warnings = [w for w in rec.get("warnings", []) if isinstance(w, str)]
    if not warnings:
        return None
    system = rec.get("system")
    extra = None
    if isinstance(system, str) and system and not d.system:
        extra = Div(Details(Summary("Show the notebook's system prompt"), Pre(system),
                            cls="imported-system"),
                    Button("Use it as the system prompt", hx_post=paths.settings.to(did=d.id),
                           hx_vals={"system": system}, hx_include="#dversion",
                           data_act="adopt-system", cls="secondary"))
    text_ = "Imported. " + "; ".join(w[:1].upper() + w[1:] for w in warnings) + "."
    return V.toast(text_, level="warning", extra=extra)


def _row_of(svc: DialogueService, did: str) -> Any:
    return V.dialogue_row(next(x for x in svc.list() if x["id"] == did))


@rt(paths.index)
async def index(req: Request) -> Any:
    svc = site(req).service
    q = req.query_params.get("q", "")
    hits = svc.search(q) if q.strip() else None
    folder = req.query_params.get("folder", "").strip().strip("/")
    if folder:
        folder = svc.folder(folder).path  # an unknown folder: a clear 404, not an empty list
    return V.dialogues_page(svc.list(), svc.trash(), q=q, hits=hits, folders=svc.folders(),
                            folder=folder)


@rt(paths.search)
async def search(req: Request) -> Any:
    svc = site(req).service
    q = req.query_params.get("q", "")
    try:
        hits = svc.search(q, limit=50) if q.strip() else None
    except StoreError as e:
        return refuse(str(e), 400)
    if "hx-request" not in req.headers:
        return V.dialogues_page(svc.list(), svc.trash(), q=q, hits=hits)
    return V.search_results(hits, q)


@rt(paths.new, methods=["post"])
async def new(req: Request) -> Any:
    f = await form(req)
    # in a folder, it starts from the folder's template if it has one
    d = site(req).service.create((text(f.get("name")) or "").strip(),
                                 folder=(text(f.get("folder")) or "").strip() or None)
    return Redirect(paths.dialogue.to(did=d.id))


@rt(paths.import_notebook, methods=["post"])
async def import_notebook(req: Request) -> Any:
    from ...artifacts import NotebookError, read_notebook
    svc = site(req).service
    f = await form(req)
    up = f.get("file")
    if not isinstance(up, UploadFile) or not up.filename:
        return refuse("Choose an .ipynb file to import.", 400)
    stem = Path(up.filename).stem or "notebook"
    # the page's job id: its progress box shows the steps below while they run (routes/progress.py)
    job = JOBS.begin(text(f.get("job")))
    on_progress = JOBS.reporter(job)
    try:
        # read_notebook reads the spooled upload in chunks and refuses it past the limit
        try:
            doc = await asyncio.to_thread(read_notebook, up.file, name=stem, keep_ids=True,
                                          on_progress=on_progress)
        except NotebookError as e:
            why = str(e).removeprefix("notebook: ")
            return refuse(f"Cannot import {up.filename}: {why}", status_of(e))
        # on the loop, as every store write of the app (one transaction, its step a spinner)
        d = svc.import_dialogue(doc, name=free_name(svc, doc.name or stem), on_progress=on_progress,
                                folder=(text(f.get("folder")) or "").strip() or None)
    finally:
        JOBS.end(job)
    # what the import set aside (a model, the system prompt) is told on the dialogue's page
    return Redirect(paths.dialogue.to(did=d.id, imported=1 if import_notice(d) is not None else None))


@rt(paths.row)
async def row(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.open(did)
    if req.query_params.get("edit"):
        return V.dialogue_row_edit(d)
    return _row_of(svc, d.id)


@rt(paths.rename, methods=["post"])
async def rename(did: str, req: Request) -> Any:
    svc = site(req).service
    f = await form(req)
    d = svc.open(did)
    try:
        svc.rename(d.id, (text(f.get("name")) or "").strip(),
                   base_version=opt_int(f.get("dversion"), "dversion"))
    except (NameTakenError, ConflictError, StoreError) as e:
        return HTMLResponse(to_xml(V.dialogue_row_edit(d, error=str(e))), status_code=status_of(e))
    return _row_of(svc, d.id)


@rt(paths.delete, methods=["post"])
async def delete(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.open(did)
    svc.delete(d.id)
    return "", V.toast(f"Moved “{d.name}” to the trash.", level="info",
                       undo=paths.restore.to(did=d.id))


@rt(paths.restore, methods=["post"])
async def restore(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.restore(did)
    listing = V.dialogue_list(svc.list(), svc.trash())
    listing.attrs["hx-swap-oob"] = "true"
    return (HtmxResponseHeaders(reswap="none"), listing,
            V.toast(f"Restored “{d.name}”.", level="info"))


@rt(paths.export)
async def export(did: str, fmt: str, req: Request) -> Response:
    """The dialogue as a file to download. The page's export menu fetches it (app.js) so that a
    refusal (a module with no exported cell) is told in place rather than as a page of its own,
    and a note (hidden cells left out) is told beside the download (`X-Dialogue-Note`)."""
    from urllib.parse import quote

    from ...artifacts import hidden_left_out, to_html, to_ipynb_bytes, to_markdown, to_module
    d = site(req).service.open(did)
    yes = ("1", "true", "yes")
    with_ai = req.query_params.get("ai", "") in yes
    with_hidden = req.query_params.get("hidden", "") in yes
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in d.name) or "dialogue"
    if fmt == "ipynb":
        body, mime = to_ipynb_bytes(site(req).service.for_notebook(d)), "application/x-ipynb+json"
    elif fmt == "py":
        body, mime = to_module(d).encode(), "text/x-python; charset=utf-8"
    elif fmt == "md":
        body, mime = (to_markdown(d, with_ai=with_ai, with_hidden=with_hidden).text.encode(),
                      "text/markdown; charset=utf-8")
    elif fmt == "html":
        body, mime = (to_html(d, with_ai=with_ai, with_hidden=with_hidden).encode(),
                      "text/html; charset=utf-8")
    else:
        raise NotFoundError(f"no export format {fmt!r}: use ipynb, py, md or html")
    headers = {"Content-Disposition": f'attachment; filename="{stem}.{fmt}"'}
    if fmt == "html":  # never render an export inside the app's origin
        headers["Content-Security-Policy"] = "sandbox"
    hidden = hidden_left_out(d, with_ai) if fmt in ("md", "html") and not with_hidden else 0
    if hidden:
        # percent-encoded: a header is latin-1, a dialogue's name need not be
        headers["X-Dialogue-Note"] = quote(f"{hidden} hidden cell{'s' * (hidden != 1)} left out "
                                           f"of {stem}.{fmt}: tick “Keep hidden cells” in the "
                                           f"Export menu to include {'them' if hidden != 1 else 'it'}.")
    return Response(body, media_type=mime, headers=headers)


@rt(paths.dialogue)
async def dialogue(did: str, req: Request) -> Any:
    s = site(req)
    svc = s.service
    d = svc.open(did)
    running = {m.id for m in d.messages if svc.running(m.id)}
    live = {mid: st for mid in running if (st := svc.live(mid)) is not None}
    job = svc.run_all_of(d.id)
    page = V.dialogue_page(d, s.models(), svc.kernel_status(d.id), running, live,
                           adapters=svc.adapter_view(d),
                           run_all=job.progress() if job is not None else None,
                           kernels=(svc.kernel_specs(), svc.kernel_choice(d).label()),
                           gateway_kernels=await asyncio.to_thread(svc.gateway_specs, True),
                           folder=svc.folder(d.folder).path if d.folder else "",
                           folder_notes=svc.folder_context(d))
    notice = import_notice(d) if req.query_params.get("imported") else None
    if notice is not None:  # the page's empty #toast holds it
        page = tuple(notice if getattr(x, "id", None) == "toast" else x for x in page)
    return page
