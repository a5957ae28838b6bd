"""Runs inside the kernel as the private module `_dialogue_tools` (see `Kernel.ensure_module`):
kernel functions as tools, where the functions live.

A tool's schema is computed here with `fastcore.funccall.get_schema` (signature, type hints,
docstring, `docments` comments) and calls run here with `fastcore.funccall.call_func`, which
coerces JSON arguments to the annotated types. Results go back as JSON text through `Raw`.
"""
import contextlib
import inspect
import io
import json
import os
import traceback

from _dialogue_kernel import Raw  # installed in the kernel before this module
from IPython import get_ipython

_last = None
_pending = None
_HERE = os.path.dirname(os.path.abspath(__file__))  # set by the install: this file's path


def _ns():
    return get_ipython().user_ns


def _schema(name):
    ns = _ns()
    if name not in ns:
        raise NameError(f"{name} is not defined in the kernel (run the cell that defines it)")
    f = ns[name]
    if not callable(f):
        raise TypeError(f"{name} is not a function (it is of type {type(f).__name__})")
    if not (getattr(f, "__doc__", None) or "").strip():
        raise ValueError(f"{name} has no docstring; the model needs one to know what the tool does")
    try:
        from fastcore.funccall import get_schema
    except ImportError:
        raise ImportError("fastcore is not installed in the kernel's Python (pip install fastcore)") from None
    s = get_schema(f, pname="parameters", evalable=True)
    json.dumps(s)  # fail here, with the name, if a default is not JSON
    return s


def schemas(names):
    """{name: {"ok": schema} or {"error": why}} for each name, as JSON."""
    out = {}
    for n in names:
        try:
            out[n] = {"ok": _schema(n)}
        except Exception as e:
            msg = str(e) or type(e).__name__
            out[n] = {"error": msg if n in msg else f"{n}: {msg}"}
    return Raw(json.dumps(out))


def _text(r):
    if isinstance(r, str):
        return r
    fmt = get_ipython().display_formatter.format(r, include=["text/plain"])[0]
    return fmt.get("text/plain", repr(r))


def _ok(r, buf):
    out = buf.getvalue()
    return {"ok": True, "text": out + (_text(r) if (r is not None or not out) else "")}


def _ours(filename):
    """Frames the model should not see in a tool's traceback: this machinery, not the tool."""
    return os.path.dirname(os.path.abspath(filename)) == _HERE or "fastcore" in filename


def _err(e, buf):
    te = traceback.TracebackException.from_exception(e)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if not _ours(f.filename)])
    return {"ok": False, "text": buf.getvalue() + "".join(te.format())}


def call(name, args_json):
    """Call tool `name`; the result waits in `_last` for `take`. Synchronous on purpose:
    ipykernel runs code containing `await` as a coroutine, and a coroutine stuck in blocking
    code cannot be interrupted. An async tool's coroutine is awaited by `finish`."""
    global _last, _pending
    from fastcore.funccall import call_func
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            r = call_func(name, json.loads(args_json), ns=_ns())
        if inspect.isawaitable(r):
            _pending, _last = (r, buf), {"pending": True}
        else:
            _last = _ok(r, buf)
    except Exception as e:
        _last = _err(e, buf)


async def finish():
    global _last, _pending
    (r, buf), _pending = _pending, None
    try:
        with contextlib.redirect_stdout(buf):
            v = await r
        _last = _ok(v, buf)
    except Exception as e:
        _last = _err(e, buf)


def take():
    """The last call's result as JSON ({"ok", "text"}, or {"pending": True}), once."""
    global _last
    r, _last = _last, None
    return Raw(json.dumps(r))
