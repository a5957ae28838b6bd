"""A dialogue's adapter set, and trials: one prompt answered under two adapter sets side by side
(A then B over one event stream), storing nothing until the user keeps an answer or adopts a set.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any, AsyncIterator

from fasthtml.common import APIRouter, HTMLResponse, HtmxResponseHeaders, StreamingResponse, to_xml
from starlette.datastructures import FormData
from starlette.requests import Request

from ...document import Dialogue
from ...service import (Answer, ConflictError, DialogueService, ProviderError, StoreError,
                        follow)
from .. import paths
from .. import views as V
from ..common import Trial, event_stream, form, opt_int, refuse, site, status_of, text

log = logging.getLogger("dialogue.web")

rt = APIRouter()


def parse_set(f: FormData, prefix: str) -> dict[str, float]:
    """An adapter set from an editor's fields: `<prefix>-on` (checked names) and
    `<prefix>-scale:<name>` (each one's scale; empty means 1)."""
    out: dict[str, float] = {}
    for raw_name in f.getlist(f"{prefix}-on"):
        name = str(raw_name).strip()
        if not name:
            continue
        raw = f.get(f"{prefix}-scale:{name}")
        value = "1" if raw is None or str(raw).strip() == "" else str(raw).strip()
        try:
            scale = float(value)
        except ValueError:
            raise ValueError(f"the scale of {name} must be a number, not {value!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"the scale of {name} must be a finite number, not {value!r}")
        out[name] = scale
    return out


def set_text(adapters: dict[str, float]) -> str:
    return ", ".join(f"{V._short(k)} ×{v:g}" for k, v in adapters.items()) if adapters else ""


def store_set(svc: DialogueService, did: str, adapters: dict[str, float] | None,
              base: int | None) -> Any:
    """Store a set (versioned); a refusal (unknown, mismatch, a stale page) is a toast and
    changes nothing."""
    try:
        d = svc.set_adapters(did, adapters, base_version=base)
    except ConflictError as e:  # another tab changed the settings: offer to reload
        from fasthtml.common import A
        body = to_xml(V.toast(f"Not saved: {e}", extra=A("Reload", href=paths.dialogue.to(did=did),
                                                          cls="toast-link")))
        return HTMLResponse(body, status_code=409, headers={"HX-Reswap": "none"})
    except (ProviderError, StoreError, ValueError) as e:
        return refuse(f"Not saved: {e}", status_of(e))
    label = set_text(dict(d.meta.get("adapters") or {}))
    return (HtmxResponseHeaders(reswap="none"), V.dversion_input(d, oob=True),
            V.adapters_control(d, svc.adapter_view(d), oob=True),
            V.toast(f"Adapters: {label}" if label else "No adapters: the base model answers.",
                    level="info"))


@rt(paths.adapters, methods=["post"])
async def adapters(did: str, req: Request) -> Any:
    svc = site(req).service
    f = await req.form()
    d = svc.open(did, messages=False)
    base = opt_int(f.get("dversion"), "dversion")
    new = None if f.get("clear") else parse_set(f, "set")
    if new:
        # Checking a set against a base the registry has not seen parses the base's GGUF
        # (seconds): do that off the event loop; the store write below then finds it cached.
        # A refusal here is raised again, with the same message, by svc.set_adapters.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(svc.resolve_adapters, d.model, new)
    return store_set(svc, d.id, new, base)


def _local_only(d: Dialogue) -> Any | None:
    if d.model.startswith("local:"):
        return None
    return refuse(f"Adapters apply to local models only; {d.model} is not one. Choose a local "
                  "model to compare adapter sets.")


@rt(paths.trial_dialog)
async def trial_dialog(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.open(did)
    return _local_only(d) or V.trial_dialog(d, svc.adapter_view(d))


@rt(paths.trials, methods=["post"])
async def new_trial(did: str, req: Request) -> Any:
    s = site(req)
    f = await req.form()
    d = s.service.open(did)
    if (no := _local_only(d)) is not None:
        return no
    source = text(f.get("source")) or ""
    if not source.strip():
        return refuse("Write a prompt to compare the answers to.")
    max_tokens = opt_int(f.get("max_tokens"), "max tokens")
    if max_tokens is not None and max_tokens < 1:
        return refuse("Max tokens must be at least 1.")
    sets = {"a": parse_set(f, "a"), "b": parse_set(f, "b")}
    # The editors offer only adapters that fit (and the dialogue's own entries): anything
    # else, or an entry shown as broken, is refused here rather than in a column.
    view = s.service.adapter_view(d)
    ok = ({c.name for c in view.choices} | set(d.meta.get("adapters") or {})) - set(view.problems)
    for side, chosen in sets.items():
        for name in chosen:
            if name not in ok:
                why = view.problems.get(name, f"not a registered adapter for {d.model}")
                return refuse(f"Set {side.upper()}: {name}: {why}.")
    t = s.trials.new(d.id, source, sets, max_tokens)
    return V.trial_out(d.id, t.id, sets)


@rt(paths.trial_stream)
async def trial_stream(did: str, tid: str, req: Request) -> StreamingResponse:
    s = site(req)
    svc = s.service
    t = s.trials.get(svc.dialogue_id(did), tid)

    async def events() -> AsyncIterator[str]:
        if t is None:
            yield V.sse("end-a", to_xml(V.toast("This comparison is over; run it again.")))
            yield V.sse("close", "")
            return
        if t.started:  # EventSource reconnected: show where it ended, never run it twice
            for side in ("a", "b"):
                res = t.results.get(side) or {"error": "cut off: the connection was lost"}
                yield V.sse(f"end-{side}", to_xml(V.trial_column(t.did, t.id, side, t.sets[side],
                                                                 result=res)))
            yield V.sse("close", "")
            return
        t.started = True
        try:
            for side in ("a", "b"):
                if side == "b":
                    yield V.sse("status-b", to_xml(V.trial_status("b", "answering…")))
                async for chunk in side_events(svc, t, side):
                    yield chunk
        except Exception:  # a rendering bug must not leave EventSource reconnecting forever
            log.exception("trial %s failed", t.id)
        yield V.sse("close", "")

    return event_stream(req, events())


async def side_events(svc: DialogueService, t: Trial, side: str) -> AsyncIterator[str]:
    """One side of a trial. The service's generator is closed however this ends: when the page
    goes away (the dialog closed, the tab closed) Starlette cancels the response and the
    cancellation reaches the model's worker, which stops within a token."""
    res: dict[str, Any] = {"text": "", "usage": {}, "seconds": 0.0, "error": "", "kept": False,
                           "done": False}
    t.results[side] = res
    ans = Answer()
    async for _ in follow(svc.trial(t.did, t.source, adapters=t.sets[side],
                                    max_tokens=t.max_tokens), ans):
        if len(ans.text) > len(res["text"]):
            piece, res["text"] = ans.text[len(res["text"]):], ans.text
            yield V.sse(f"text-{side}", V.text_chunk(piece))
    res.update(error=ans.error, usage=ans.record(svc.open(t.did, messages=False).model),
               seconds=ans.seconds, done=True)
    extra = to_xml(V.toast(f"{side.upper()}: {res['error']}")) if res["error"] else ""
    yield V.sse(f"end-{side}", to_xml(V.trial_column(t.did, t.id, side, t.sets[side],
                                                     result=res)) + extra)


async def _trial_side(did: str, tid: str, req: Request) -> tuple[Any, Trial, str]:
    """The form, the trial and the side ("a" or "b"; "" if the form names neither)."""
    s = site(req)
    f = await form(req)
    t = s.trials.of(s.service.dialogue_id(did), tid)
    side = text(f.get("side")) or ""
    return f, t, side if side in t.sets else ""


@rt(paths.keep_trial, methods=["post"])
async def keep_trial(did: str, tid: str, req: Request) -> Any:
    svc = site(req).service
    f, t, side = await _trial_side(did, tid, req)
    if not side:
        return refuse("unknown side: a or b")
    res = t.results.get(side)
    if res is None or not res.get("done"):
        return refuse(f"Answer {side.upper()} is not finished yet.", 409)
    if res.get("error") or not res.get("text"):
        return refuse(f"Answer {side.upper()} has nothing to keep.", 409)
    if res.get("kept"):
        return refuse(f"Answer {side.upper()} is already kept.", 409)
    res["kept"] = True  # before the write: a double click must not add it twice
    try:
        m = svc.add(t.did, "prompt", t.source, response=res["text"], usage=dict(res["usage"]),
                    meta={"adapters": dict(t.sets[side]), "trial": True})
    except BaseException:
        res["kept"] = False
        raise
    d = svc.open(t.did)
    label = set_text(t.sets[side]) or "no adapters"
    return (HtmxResponseHeaders(retarget="#cells", reswap="beforeend"), V.cell(t.did, m),
            V.keep_button(t.did, t.id, side, kept=True, oob=True), V.totals(d, oob=True),
            V.toast(f"Kept answer {side.upper()} ({label}) at the end of the dialogue.",
                    level="info"))


@rt(paths.use_trial, methods=["post"])
async def use_trial(did: str, tid: str, req: Request) -> Any:
    f, t, side = await _trial_side(did, tid, req)
    if not side:
        return refuse("unknown side: a or b")
    return store_set(site(req).service, t.did, dict(t.sets[side]) or None,
                     opt_int(f.get("dversion"), "dversion"))
