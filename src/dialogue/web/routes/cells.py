"""Cells: add, show, save, change kind or flags, move, delete and undelete, edit an answer, the
history of a cell, and fork the dialogue at a cell."""
from __future__ import annotations

import json
from typing import Any, Callable

from fasthtml.common import APIRouter, Div, HTMLResponse, HtmxResponseHeaders, Redirect, to_xml
from starlette.requests import Request
from starlette.responses import JSONResponse

from ...document import FLAGS, Kind, Message
from ...service import ConflictError, DialogueService, ImageError
from .. import paths
from .. import views as V
from ..common import MAX_UPLOAD, form, int_field, opt_int, refuse, site, text

rt = APIRouter()


def render(svc: DialogueService, did: str, m: Message, **kw: Any) -> Any:
    return V.cell(did, m, running=svc.running(m.id), **kw)


def apply_text(svc: DialogueService, did: str, mid: str, f: dict[str, Any],
               show: Callable[..., Any] | None = None) -> Message | HTMLResponse:
    """Store the source (and answer) the page sent, if they differ from what is stored. A stale
    version is refused with the cell shown in conflict (by `show`), the user's text kept in its
    editor."""
    show = show or (lambda x, **kw: render(svc, did, x, **kw))
    m = svc.message(did, mid)
    changes = {}
    src, resp = text(f.get("source")), text(f.get("response"))
    if src is not None and src != m.source:
        changes["source"] = src
    if resp is not None and resp != m.response:
        changes["response"] = resp
    if not changes:
        return m
    base = opt_int(f.get("version"), "version")
    try:
        # a new source drops the images it no longer shows (the editor's paste adds them)
        return svc.edit(did, mid, base_version=base if base is not None else m.version,
                        prune_attachments=True, **changes)
    except ConflictError as e:
        cur = svc.message(did, mid)
        return HTMLResponse(to_xml(show(cur, conflict={
            **typed(svc, did, mid, base, src, resp, cur), "message": str(e)})), status_code=409)


def typed(svc: DialogueService, did: str, mid: str, base: int | None, src: str | None,
          resp: str | None, cur: Message) -> dict[str, str | None]:
    """What the user typed in a refused save, for the conflict view to keep in its editors:
    `mine` (the source) and `answer`, each None where the page sent what it was showing (the
    version it was based on), so the editor then holds what is stored now and "save mine over it"
    does not write a stale copy of a part the user never touched over another tab's change (the
    page sends the whole cell, its source included, when only the answer was edited)."""
    shown = next((v.state for v in svc.history(did, mid) if v.version == base), None) \
        if base is not None else None
    mine = src if src is not None and (shown is None or src != shown.get("source")) else None
    answer = resp if resp is not None and (shown is None or resp != shown.get("response")) \
        else None
    if mine is None and answer is None:  # nothing of the user's own: show the source they sent
        mine = src if src is not None else cur.source
    return {"mine": mine, "answer": answer}


@rt(paths.cells, methods=["post"])
async def add_cell(did: str, req: Request) -> Any:
    svc = site(req).service
    f = await form(req)
    d = svc.dialogue_id(did)
    kind = text(f.get("kind")) or "code"
    after, before = text(f.get("after")) or None, text(f.get("before")) or None
    # a paste (the page's v / Shift+V) brings a copied cell's source and opens no editor; not
    # "source", which an add button inside a cell sends as that cell's own (hx-include)
    paste = text(f.get("paste"))
    m = svc.add(d, kind, paste or "", after=after, before=before)
    if after:
        target, swap = f"#m-{svc.message_id(d, after)}", "afterend"
    elif before:
        target, swap = f"#m-{svc.message_id(d, before)}", "beforebegin"
    else:
        target, swap = "#cells", "beforeend"
    return (HtmxResponseHeaders(retarget=target, reswap=swap),
            render(svc, d, m) if paste is not None else render(svc, d, m, editing=True, new=True))


@rt(paths.cell)
async def get_cell(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    return render(svc, svc.dialogue_id(did), svc.message(did, mid))


@rt(paths.save, methods=["post"])
async def save(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    m = apply_text(svc, d, mid, await form(req))
    return m if isinstance(m, HTMLResponse) else render(svc, d, m)


@rt(paths.kind, methods=["post"])
async def kind(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    m = apply_text(svc, d, mid, f)
    if isinstance(m, HTMLResponse):
        return m
    k = text(f.get("kind")) or ""
    if k not in (x.value for x in Kind):
        return refuse(f"unknown kind {k!r}: use code, note or prompt")
    if k != m.kind.value:
        m = svc.edit(d, m.id, base_version=m.version, kind=k)
    return render(svc, d, m)


@rt(paths.flag, methods=["post"])
async def flag(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    name = text(f.get("flag")) or ""
    if name not in FLAGS:
        return refuse(f"unknown flag {name!r}; flags are {', '.join(FLAGS)}")
    m = apply_text(svc, d, mid, f)
    if isinstance(m, HTMLResponse):
        return m
    value = f.get("value")
    new = (not getattr(m, name)) if value in (None, "") else value in ("1", "true", "on")
    base = opt_int(f.get("version"), "version")
    if "source" in f or "response" in f:  # apply_text has just checked (and maybe moved) it
        base = m.version
    m = svc.set_flags(d, m.id, base_version=base if base is not None else m.version,
                      **{name: new})
    return render(svc, d, m)


@rt(paths.move, methods=["post"])
async def move(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    m = svc.move(d, mid, by=int_field(f.get("by", 0), "by"))
    ids = [x.id for x in svc.open(d).messages]
    i = ids.index(m.id)
    after = ids[i - 1] if i > 0 else ""
    return HtmxResponseHeaders(trigger=json.dumps({"dlgMoved": {"id": m.id, "after": after}}))


@rt(paths.delete_cell, methods=["post"])
async def delete_cell(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    m = svc.message(d, mid)
    if svc.running(m.id):
        return refuse("This cell is running: stop it before deleting it.", 409)
    svc.delete_message(d, m.id, base_version=opt_int(f.get("version"), "version"))
    first = (m.source.strip().splitlines() or [""])[0][:40]
    return "", V.toast(f"Deleted {m.kind.value} cell" + (f" “{first}”" if first else "") + ".",
                       level="info", undo=paths.undelete.to(did=d, mid=m.id))


@rt(paths.undelete, methods=["post"])
async def undelete(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    m = svc.restore_message(d, mid)
    if req.query_params.get("to") == "list":  # from the dialogues page's trash
        listing = V.dialogue_list(svc.list(), svc.trash())
        listing.attrs["hx-swap-oob"] = "true"
        return (HtmxResponseHeaders(reswap="none"), listing,
                V.toast(f"Restored a {m.kind.value} cell of “{svc.open(d, messages=False).name}”.",
                        level="info"))
    ids = [x.id for x in svc.open(d).messages]
    i = ids.index(m.id)
    if i > 0:
        target, swap = f"#m-{ids[i - 1]}", "afterend"
    elif len(ids) > 1:
        target, swap = f"#m-{ids[1]}", "beforebegin"
    else:
        target, swap = "#cells", "beforeend"
    return (HtmxResponseHeaders(retarget=target, reswap=swap), render(svc, d, m),
            V.toast("Restored.", level="info"))


@rt(paths.images, methods=["post"])
async def add_images(did: str, mid: str, req: Request) -> Any:
    """Images pasted, dropped or chosen in a note's or prompt's editor (multipart `image` files
    and the cell's `version`): stored as the message's attachments, checked by their bytes (not
    the browser's type); JSON back, {names, refs, version}, for the page to put each reference at
    the cursor and move the cell's version on, or {error} with why nothing was stored."""
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await req.form(max_part_size=MAX_UPLOAD)
    files = [x for x in f.getlist("image") if hasattr(x, "read")]
    if not files:
        return JSONResponse({"error": "no image came with the request"}, status_code=400)
    if svc.running(svc.message_id(d, mid)):
        return JSONResponse({"error": "This cell is running: add images once it has finished."},
                            status_code=409)
    images = [(x.filename or "image", await x.read()) for x in files]
    try:
        m, names = svc.add_images(d, mid, images, base_version=opt_int(f.get("version"), "version"),
                                  reference=False)
    except ImageError as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    except ConflictError as e:
        return JSONResponse({"error": f"{e} Reload the cell, then add the image again."},
                            status_code=409)
    return JSONResponse({"names": names, "refs": [svc.image_ref(n) for n in names],
                         "version": m.version})


@rt(paths.answer)
async def answer(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    return V.answer_editor(d, svc.message(d, mid))


@rt(paths.history)
async def history(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    m = svc.message(d, mid)
    return V.history_modal(d, m, svc.history_steps(d, m.id))


@rt(paths.restore_version, methods=["post"])
async def restore_version(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    m = svc.restore_version(d, mid, int_field(f.get("to"), "version to restore"),
                            base_version=opt_int(f.get("version"), "version"))
    return render(svc, d, m), Div(id="modal", hx_swap_oob="true")


@rt(paths.merge, methods=["post"])
async def merge(did: str, mid: str, req: Request) -> Any:
    """Shift+M: this cell takes the source of the one below, which goes to the trash."""
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    below = _below(svc, d, svc.message_id(d, mid))
    if below is not None and (svc.running(below) or svc.running(svc.message_id(d, mid))):
        return refuse("A cell is running: stop it before merging.", 409)
    m = svc.merge_below(d, mid, base_version=opt_int(f.get("version"), "version"))
    return (render(svc, d, m), Div(id=f"m-{below}", hx_swap_oob="delete"),
            V.toast("Merged with the cell below (it is in the trash; the history has both).",
                    level="info"))


def _below(svc: DialogueService, did: str, mid: str) -> str | None:
    ids = [x.id for x in svc.messages(did)]
    i = ids.index(mid)
    return ids[i + 1] if i + 1 < len(ids) else None


@rt(paths.split, methods=["post"])
async def split(did: str, mid: str, req: Request) -> Any:
    """Ctrl+Shift+Minus in the editor: split the cell at the cursor (the editor's text, saved)."""
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    if svc.running(svc.message_id(d, mid)):
        return refuse("This cell is running: stop it before splitting it.", 409)
    first, second = svc.split_at(d, mid, int_field(f.get("at"), "split position"),
                                 base_version=opt_int(f.get("version"), "version"),
                                 source=text(f.get("source")))
    return render(svc, d, first), render(svc, d, second)


@rt(paths.fork, methods=["post"])
async def fork(did: str, mid: str, req: Request) -> Any:
    new = site(req).service.fork(did, mid)
    return Redirect(paths.dialogue.to(did=new.id))
