"""`dialogue serve`: the web app on this database. The one place the CLI reaches another surface:
it starts it, and the web app reads the database through a service of its own."""
from __future__ import annotations

import argparse

from .. import config
from ..service import DialogueService
from .common import UserError


def cmd_serve(svc: DialogueService, a: argparse.Namespace) -> int:
    ping = _sse_ping()  # a bad setting is refused before anything starts
    svc.close()
    from ..web import serve
    serve(db=a.db, host=a.host, port=a.port, open_browser=not a.no_browser, token=a.token,
          access_log=a.access_log or config.flag("access_log"), **ping)
    return 0


def _sse_ping() -> dict[str, float]:
    """The sse_ping setting (DIALOGUE_SSE_PING or the config file), if set: seconds between the
    keep-alive comments of a quiet event stream."""
    v = config.get("sse_ping")
    if v is None:
        return {}
    try:
        f = float(v)
    except ValueError:
        f = 0.0
    if not 0 < f <= 3600:
        raise UserError(f"sse_ping (DIALOGUE_SSE_PING) must be seconds between 0 and 3600, not {v!r}")
    return {"sse_ping": f}


def _args_serve(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5001)
    sp.add_argument("--no-browser", action="store_true")
    sp.add_argument("--token", help="access token (generated when binding beyond localhost)")
    sp.add_argument("--access-log", action="store_true",
                    help="one JSON line per request on stderr (also: access_log in the config file)")


COMMANDS = {"serve": (cmd_serve, "open the web app", _args_serve)}
