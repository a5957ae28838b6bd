"""A dialogue's settings (name, model, system prompt), its attached context, and its kernel."""
from __future__ import annotations

import asyncio
from typing import Any

from fasthtml.common import APIRouter, Div, HtmxResponseHeaders
from starlette.datastructures import UploadFile
from starlette.requests import Request

from ...document import Dialogue
from ...service import approval_settings, mode_of
from .. import paths
from .. import views as V
from ..common import Site, form, oob, opt_int, refuse, site, text

rt = APIRouter()

NOTES = {"name": "Renamed.", "settings": "Settings saved.", "context": "Attached context saved."}


def saved(s: Site, d: Dialogue, note: str) -> tuple:
    """Everything on the page that shows a dialogue setting, swapped out of band, and a toast."""
    return (HtmxResponseHeaders(reswap="none"), V.dversion_input(d, oob=True),
            V.dialogue_title(d, oob=True), V.model_picker(d, s.models(), oob=True),
            V.adapters_control(d, s.service.adapter_view(d), oob=True),
            V.settings_panel(d, open_=True, oob=True) if note in ("settings", "context")
            else V.model_input(d, oob=True),
            V.toast(f"Model: {d.model}" if note == "model" else NOTES.get(note, "Saved."),
                    level="info"))


@rt(paths.settings, methods=["post"])
async def settings(did: str, req: Request) -> Any:
    s = site(req)
    f = await form(req)
    d = s.service.open(did)
    base = opt_int(f.get("dversion"), "dversion")
    changes: dict[str, Any] = {}
    for k in ("name", "model", "system"):
        v = text(f.get(k))
        if v is None:
            continue
        v = v.strip() if k != "system" else v
        if v != getattr(d, k):
            changes[k] = v
    if text(f.get("generation")):
        changes.update(generation_changes(d, f))
    changes.update(mode_changes(d, f))
    tools = None
    if text(f.get("doc_tools_form")):  # the checked document tools (none: off)
        tools = [str(x) for x in (await req.form()).getlist("doc_tool")]
        if tools == s.service.doc_tools(d):
            tools = None
    approvals = approval_changes(d, f, await req.form()) if text(f.get("approvals_form")) else {}
    if not changes and tools is None and not approvals:
        return (HtmxResponseHeaders(reswap="none"), V.dversion_input(d, oob=True))
    # the service refuses a model no provider serves
    if changes:
        d = s.service.update(d.id, base_version=base, **changes)
        base = d.version
    if tools is not None:
        d = s.service.set_doc_tools(d.id, tools or None, base_version=base)
        changes["doc_tools"] = tools
    if approvals:
        d = s.service.set_approvals(d.id, base_version=base, **approvals)
        changes["approvals"] = approvals
    note = "name" if set(changes) == {"name"} else "model" if set(changes) == {"model"} \
        else "settings"
    return saved(s, d, note)


def approval_changes(d: Dialogue, f: dict[str, Any], raw: Any) -> dict[str, Any]:
    """What the Approvals fields change ({} nothing): reading tools asking or not, and the
    always-allowed tools still ticked (a box only takes a tool off; "Always allow" adds one)."""
    now = approval_settings(d.meta)
    out: dict[str, Any] = {}
    ask = bool(text(f.get("ask_reads")))
    if ask != now["ask_reads"]:
        out["ask_reads"] = ask
    kept = {str(x) for x in raw.getlist("always_tool")}
    if any(n not in kept for n in now["always"]):
        out["always"] = [n for n in now["always"] if n in kept]
    return out


def mode_changes(d: Dialogue, f: dict[str, Any]) -> dict[str, Any]:
    """The mode the form asks for: another mode with its text untouched takes that mode's preset
    text; an edited text is kept as written (under the mode chosen)."""
    mode, prompt = text(f.get("mode")), text(f.get("mode_prompt"))
    if mode is None and prompt is None:
        return {}
    try:
        was, was_text = mode_of(d.meta)
    except ValueError:
        was, was_text = "", None
    prompt = None if prompt is None else prompt.strip()
    if mode is not None and mode != was and prompt == was_text:
        return {"mode": mode}  # its preset text
    if mode not in (None, was) or (prompt is not None and prompt != was_text):
        return {"mode": mode or was or "standard", "mode_prompt": prompt}
    return {}


def generation_changes(d: Dialogue, f: dict[str, Any]) -> dict[str, Any]:
    """The answer settings of the form that differ from the dialogue's (the service checks the
    values: a bad one is refused in one line and nothing is stored)."""
    out: dict[str, Any] = {}
    mt = (text(f.get("max_tokens")) or "").strip()
    if (mt or None) != (str(d.meta["max_tokens"]) if "max_tokens" in d.meta else None):
        out["max_tokens"] = mt or None
    lim = (text(f.get("output_limit")) or "").strip()
    if lim != V.output_limit_text(d.meta):
        out["output_limit"] = lim or "default"
    # unchecked boxes send nothing; a switch turned on goes back to the default (None), one
    # turned off is set; the dialogue's other sampling settings (from the CLI) are kept
    sampling: dict[str, Any] = {}
    if bool(text(f.get("dry"))) != V.dry_on(d.meta):
        sampling["dry_multiplier"] = None if text(f.get("dry")) else 0.0
    if bool(text(f.get("loop_stop"))) != V.loop_stop_on(d.meta):
        sampling["loop_stop"] = None if text(f.get("loop_stop")) else False
    if sampling:
        out["sampling"] = sampling
    return out


@rt(paths.context, methods=["post"])
async def context(did: str, req: Request) -> Any:
    s = site(req)
    svc = s.service
    f = await form(req)
    d = svc.open(did)
    base = opt_int(f.get("dversion"), "dversion")
    action = text(f.get("action")) or "add"
    name = (text(f.get("name")) or "").strip()
    if action == "source":  # a path on the server, a package's docs or a URL, read there
        given = {k: (text(f.get(k)) or "").strip() for k in ("path", "package", "url")}
        if sum(bool(v) for v in given.values()) != 1:
            return refuse("Give one of: a file or folder path, a package name, a URL.")
        d, loaded = await asyncio.to_thread(
            svc.attach_source, d.id, name=name or None, base_version=base,
            **{k: v for k, v in given.items() if v})
        return (*saved(s, d, "context")[:-1],
                V.toast(f"Attached {loaded.name}: {loaded.summary()}", level="info"))
    if action == "refresh":  # one item (`name`) or all of those with a source
        d, report = await asyncio.to_thread(svc.refresh, d.id, name or None, base_version=base)
        changed = [r["name"] for r in report if r.get("changed")]
        failed = [f"{r['name']}: {r['error']}" for r in report if "error" in r]
        note = (f"Refreshed: {', '.join(changed)} changed." if changed else "Refreshed: no changes.")
        return (*saved(s, d, "context")[:-1],
                V.toast(note + (" Not read: " + "; ".join(failed) if failed else ""),
                        level="error" if failed else "info"))
    if not name:
        return refuse("An attached context item needs a name.")
    if action == "remove":
        return saved(s, svc.detach(d.id, name, base_version=base), "context")
    if action not in ("add", "save"):
        return refuse(f"unknown context action {action!r}")
    content = text(f.get("content")) or ""
    kind, source = "text", ""
    up = f.get("file")
    if isinstance(up, UploadFile) and up.filename:
        raw = await up.read()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            return refuse(f"{up.filename} is not UTF-8 text; attach text files only.")
        kind, source = "file", up.filename
    old = next((c for c in d.context if c.name == name), None)
    if action == "add" and old is not None:
        return refuse(f"There is already an attached item named {name!r}.", 409)
    if action == "add" and not content.strip():
        return refuse("Paste some text or choose a file to attach.")
    if old is not None:  # an edit keeps what the item is and where it came from
        kind, source = old.kind, source or old.source
    d = svc.attach(d.id, name, content, kind=kind, source=source, base_version=base)
    return saved(s, d, "context")


@rt(paths.context_status)
async def context_status(did: str, req: Request) -> Any:
    """The attached items' tokens and KV cache state: counted by the model's tokenizer, which
    for a local model runs in its process (started if needed), so off the event loop."""
    svc = site(req).service
    d = svc.open(did, messages=False)
    return V.context_status(d, await asyncio.to_thread(svc.context_status, d.id))


@rt(paths.kernel)
async def kernel(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    return V.kernel_badge(d, svc.kernel_status(d))


@rt(paths.kernel_interrupt, methods=["post"])
async def kernel_interrupt(did: str, req: Request) -> Any:
    svc = site(req).service
    d = svc.dialogue_id(did)
    await svc.interrupt(d)
    return V.kernel_badge(d, svc.kernel_status(d))


@rt(paths.kernel_restart, methods=["get"])
async def kernel_restart_confirm(did: str, req: Request) -> Any:
    """The question before a restart (the ⟳ button opens it in the page's modal)."""
    svc = site(req).service
    d = svc.dialogue_id(did)
    return V.restart_confirm(d, svc.kernel_status(d))


@rt(paths.kernel_restart, methods=["post"])
async def kernel_restart(did: str, req: Request) -> Any:
    """Restart in the background: the badge says "restarting…" and looks again every half
    second until the new kernel is ready."""
    svc = site(req).service
    d = svc.dialogue_id(did)
    svc.start_restart(d)
    return (V.kernel_badge(d, svc.kernel_status(d)), Div(id="modal", hx_swap_oob="true"))


def kernel_controls(svc: Any, d: Dialogue) -> tuple:
    """The kernel picker and badge, swapped out of band, and the modal closed."""
    return (V.kernel_picker(d, svc.kernel_specs(), svc.kernel_choice(d).label(), oob=True,
                            gateway=svc.gateway_specs(quiet=True)),
            oob(V.kernel_badge(d.id, svc.kernel_status(d.id))), Div(id="modal", hx_swap_oob="true"))


@rt(paths.kernel_choice, methods=["get"])
async def kernel_choice_view(did: str, req: Request) -> Any:
    """The picker as stored (after a cancelled "Python interpreter…")."""
    svc = site(req).service
    return (HtmxResponseHeaders(reswap="none"), *kernel_controls(svc, svc.open(did, messages=False)))


@rt(paths.kernel_choice, methods=["post"])
async def kernel_choice(did: str, req: Request) -> Any:
    """Choose the dialogue's kernel: "" (the app's own Python), "spec:NAME", "gateway:NAME"
    (a kernel of the configured gateway), or "python:" with
    a `python` path (without one: ask for it). The running kernel is shut down; the next run
    starts the chosen one. A bad choice is refused in one line and nothing changes."""
    svc = site(req).service
    f = await form(req)
    d = svc.open(did, messages=False)
    base = opt_int(f.get("dversion"), "dversion")
    value = text(f.get("kernel")) or ""
    python = (text(f.get("python")) or "").strip()
    if value == V.PYTHON_CHOICE and not python:
        return (HtmxResponseHeaders(retarget="#modal", reswap="innerHTML"), V.python_dialog(d.id))
    if value.startswith("spec:"):
        d = await svc.use_kernel(d.id, value.removeprefix("spec:"), base_version=base)
    elif value.startswith("gateway:"):
        d = await svc.use_kernel(d.id, gateway=value.removeprefix("gateway:"), base_version=base)
    elif value.startswith("python:"):
        d = await svc.use_kernel(d.id, python=python or value.removeprefix("python:"),
                                 base_version=base)
    elif value:
        return refuse(f"unknown kernel choice {value!r}")
    else:
        d = await svc.use_kernel(d.id, None, base_version=base)
    label = svc.kernel_choice(d).label()
    return (HtmxResponseHeaders(reswap="none"), V.dversion_input(d, oob=True),
            *kernel_controls(svc, d),
            V.toast(f"Kernel: {label}. The next run starts it.", level="info"))
