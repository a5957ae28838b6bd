"""Folders on the dialogue list: make one, its settings (path, context note, template), delete
it (only empty, or moving what it holds up a level), and move a dialogue into one."""
from __future__ import annotations

from typing import Any

from fasthtml.common import APIRouter, HTMLResponse, HtmxResponseHeaders, to_xml
from starlette.requests import Request

from ...service import ConflictError, NameTakenError, StoreError
from .. import paths
from .. import views as V
from ..common import form, opt_int, site, status_of, text

rt = APIRouter()


def _to_list(folder: str = "") -> HtmxResponseHeaders:
    """Load the list page again (showing `folder`): a folder's change shows in its section, the
    new-dialogue picker and the grouped list alike."""
    return HtmxResponseHeaders(redirect=paths.index.to(folder=folder or None))


@rt(paths.folders, methods=["post"])
async def new_folder(req: Request) -> Any:
    f = await form(req)
    made = site(req).service.new_folder(text(f.get("path")) or "")
    return _to_list(made.path)


@rt(paths.folder, methods=["get"])
async def folder_settings(fid: str, req: Request) -> Any:
    if req.query_params.get("close"):
        return ""
    svc = site(req).service
    return V.folder_form(svc.folder(fid), svc.list(), history=svc.folder_history(fid))


@rt(paths.folder, methods=["post"])
async def save_folder(fid: str, req: Request) -> Any:
    svc = site(req).service
    f = await form(req)
    base = opt_int(f.get("fversion"), "fversion")
    try:
        folder = svc.set_folder(fid, path=text(f.get("path")) or None, note=text(f.get("note")),
                                template=text(f.get("template")), base_version=base)
    except (ConflictError, NameTakenError, StoreError) as e:
        form_ = V.folder_form(svc.folder(fid), svc.list(), error=str(e),
                              history=svc.folder_history(fid))
        return HTMLResponse(to_xml(form_),
                            status_code=status_of(e), headers={"HX-Retarget": "#folder-edit",
                                                                "HX-Reswap": "innerHTML"})
    return _to_list(folder.path)


@rt(paths.folder_delete, methods=["post"])
async def delete_folder(fid: str, req: Request) -> Any:
    svc = site(req).service
    gone = svc.remove_folder(fid, move_up=req.query_params.get("up") == "1")
    return _to_list(svc.folder(gone.parent).path if gone.parent else "")


@rt(paths.move_to, methods=["get"])
async def move_form(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.open(did, messages=False)
    current = svc.folder(d.folder).path if d.folder else ""
    return V.move_row(d, svc.folders(), current)


@rt(paths.move_to, methods=["post"])
async def move_to(did: str, req: Request) -> Any:
    svc = site(req).service
    f = await form(req)
    d = svc.move_to(did, text(f.get("folder")) or "",
                    base_version=opt_int(f.get("dversion"), "dversion"))
    where = svc.folder(d.folder).path if d.folder else ""
    shown = (text(f.get("shown")) or "").strip()  # the folder the list was filtered to
    return (V.dialogue_list(svc.list(), svc.trash(), folder=shown),
            V.toast(f"Moved “{d.name}” to " + (f"“{where}”." if where else "the top level."),
                    level="info"))
