"""Running: one cell (run, stop, and its live event stream) and Run all (start, stop, and the
stream that puts each started cell in its running state)."""
from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from fasthtml.common import APIRouter, HTMLResponse, Response, to_xml
from starlette.requests import Request

from ...document import Kind
from ...service import LiveState, RunError
from .. import paths
from .. import views as V
from ..common import event_stream, form, oob, opt_int, refuse, site, text
from .cells import apply_text

log = logging.getLogger("dialogue.web")

rt = APIRouter()


@rt(paths.run_cell, methods=["post"])
async def run_cell(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    f = await form(req)
    m = svc.message(d, mid)
    show = lambda x, **kw: V.cell(d, x, **kw)  # noqa: E731
    if m.kind not in (Kind.code, Kind.prompt):  # "running" a note shows it: save, render
        saved = apply_text(svc, d, m.id, f, show)
        return saved if isinstance(saved, HTMLResponse) else V.cell(d, saved)
    if svc.running(m.id):
        raise RunError("This cell is already running.")
    # save what the editor holds first, in the same request: a separate save could race
    m = apply_text(svc, d, m.id, f, show)
    if isinstance(m, HTMLResponse):
        return m
    prefill = (text(f.get("prefill")) or None) if m.kind == Kind.prompt else None
    # input() asks on the page (input_box), and so do tool calls that need approval
    svc.start(d, m.id, prefill=prefill, stdin=True, approve="ask")
    m = svc.message(d, m.id)
    return V.cell(d, m, running=True, live=svc.live(m.id) or LiveState(m.kind, prefill or ""))


@rt(paths.stop_cell, methods=["post"])
async def stop_cell(did: str, mid: str, req: Request) -> Any:
    svc = site(req).service
    await svc.stop(svc.message(did, mid).id)
    return Response(status_code=204)


@rt(paths.cell_input, methods=["post"])
async def cell_input(did: str, mid: str, req: Request) -> Any:
    """Answer the input() the running cell waits on; its stream then takes the question away
    and shows the answered line in the output."""
    svc = site(req).service
    f = await form(req)
    svc.reply_input(svc.message(did, mid).id, text(f.get("value")) or "")
    return Response(status_code=204)


@rt(paths.cell_approve, methods=["post"])
async def cell_approve(did: str, mid: str, req: Request) -> Any:
    """Allow once, always allow (this tool in this dialogue) or deny the tool call the running
    answer waits on; its stream then takes the question away and shows the call's result."""
    svc = site(req).service
    f = await form(req)
    svc.approve(svc.message(did, mid).id, text(f.get("call")) or "", text(f.get("decision")) or "")
    return Response(status_code=204)


@rt(paths.cell_stream)
async def cell_stream(did: str, mid: str, req: Request) -> Response:
    """The run's state so far ("snapshot"), then its events as the page swaps them in, and last
    the stored result ("done"). A run that is over gets the stored result at once."""
    svc = site(req).service
    d = svc.dialogue_id(did)
    m0 = svc.message(d, mid)

    async def live_events() -> AsyncIterator[str]:
        state: LiveState | None = None
        async for what, item in svc.watch(m0.id):
            if what == "snapshot":
                state = item
                yield V.sse("snapshot", V.frag(V.live_body(d, m0, state)))
                continue
            ev = item
            reading = state.progress is not None
            shown = len(state.outputs)
            last = state.outputs[-1] if shown else None
            state.apply(ev)
            if ev.type == "text":
                if reading:  # the answer has started: it replaces the reading progress
                    yield V.sse("progress", to_xml(V.read_progress(m0.id, None)))
                yield V.sse("text", V.text_chunk(ev.data))
            elif ev.type == "progress":
                yield V.sse("progress", to_xml(V.read_progress(m0.id, state.progress)))
            elif ev.type == "output":
                t = ev.data.get("output_type")
                if t in ("clear_output", "update_display_data"):
                    yield V.sse("outputs", V.frag(V.outputs_html(state.outputs)))
                elif t == "stream" and last is not None and len(state.outputs) == shown:
                    # joined to the stream before it, whose last line it may have rewritten
                    # (a progress bar's \r): that line again and what follows it
                    tail = V.stream_update(last, state.outputs[-1])
                    if tail is not None:
                        yield V.sse("output-tail", tail)
                    else:
                        yield V.sse("output-last", V.frag(V.output_fragment(state.outputs[-1])))
                elif state.outputs:
                    yield V.sse("output", V.frag(V.output_fragment(state.outputs[-1])))
            elif ev.type == "input":  # the cell asks for a line, or was answered
                yield V.sse("input", V.frag(V.input_box(d, m0.id, ev.data)))
            elif ev.type in ("tool_call", "tool_result"):
                yield V.sse("tools", V.frag(V.tool_calls_html(state.tool_calls)))
            elif ev.type == "doc":  # the answer's document tools changed a message
                yield V.sse("doc", V.frag(doc_change(svc, d, ev.data)))
            elif ev.type == "approval":  # a call waits for the user, or was decided
                yield V.sse("approval", V.frag(V.approval_box(d, m0.id, state.pending)))
            elif ev.type == "error":  # not "error": EventSource's own connection-error event
                yield V.sse("run-error", V.frag(V.error_box(str(ev.data))))
            elif ev.type == "done":
                break

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in live_events():
                yield chunk
        except Exception:  # a rendering bug must not leave EventSource reconnecting forever
            log.exception("event stream of message %s failed", m0.id)
        # the stored state is the truth: render it, then tell EventSource not to reconnect
        m = svc.message(d, m0.id)
        dd = svc.open(d)
        yield V.sse("done", to_xml(V.result(d, m, oob_extra=[
            V.version_input(m, oob=True),
            oob(V.gutter(m, running=False)),  # the execution count
            V.totals(dd, oob=True),
            oob(V.kernel_badge(d, svc.kernel_status(d)))])))
        yield V.sse("close", "")

    return event_stream(req, events())


def doc_change(svc: Any, did: str, data: dict[str, Any]) -> list[Any]:
    """The cells to swap in for a change the model's document tools made (views.doc_change)."""
    op, mid = data.get("op", ""), data.get("id", "")
    ms = svc.messages(did)
    i = next((k for k, x in enumerate(ms) if x.id == mid), None)
    if i is None:  # deleted (or gone since)
        return V.doc_change(did, "delete", mid, None, None)
    return V.doc_change(did, op, mid, ms[i], ms[i - 1].id if i else None,
                        live=svc.live(mid) if op == "run" else None)


@rt(paths.run_all, methods=["post"])
async def run_all(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    try:
        job = svc.start_all(d, stdin=True, approve="ask")
    except RunError as e:
        if svc.run_all_of(d) is not None:
            raise  # one is running in this dialogue already: 409
        return refuse(str(e))  # nothing to run
    return V.run_all_control(d, job.progress())


@rt(paths.stop_all, methods=["post"])
async def stop_all(did: str, req: Request) -> Any:
    svc = site(req).service
    await svc.stop_all(svc.dialogue_id(did))
    return Response(status_code=204)


@rt(paths.run_all_stream)
async def run_all_stream(did: str, req: Request) -> Response:
    """Each cell the Run all starts, put in its running state (with its own stream) out of band,
    and the progress; last why it ended. `from`: how many started cells the page already shows
    (a reloaded page rendered them running)."""
    svc = site(req).service
    d = svc.dialogue_id(did)
    job = svc.run_all_of(d, finished=True)
    seen = opt_int(req.query_params.get("from"), "from") or 0

    async def events() -> AsyncIterator[str]:
        i = seen
        try:
            while job is not None:
                while i < len(job.started):
                    mid = job.started[i]
                    i += 1
                    m = svc.message(d, mid)
                    yield V.sse("cell", V.frag(
                        oob(V.result(d, m, running=True, live=svc.live(mid))),
                        oob(V.gutter(m, running=True))))
                    yield V.sse("progress", to_xml(V.run_all_progress(i, len(job.todo))))
                if job.done:
                    break
                await job.changed()
        except Exception:  # a rendering bug must not leave EventSource reconnecting forever
            log.exception("run-all stream of %s failed", d)
        end = [V.run_all_control(d, None)]
        if job is not None and job.stopped:
            end.append(V.toast(job.stopped))
        elif job is not None:
            n = len(job.started)
            end.append(V.toast(f"Ran {n} code cell{'s' if n != 1 else ''}.", level="info"))
        yield V.sse("done", V.frag(end))
        yield V.sse("close", "")

    return event_stream(req, events())
