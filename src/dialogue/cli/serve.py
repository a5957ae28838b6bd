"""`dialogue serve`: the web app on this database. The one place the CLI reaches another surface:
it starts it, and the web app reads the database through a service of its own."""
from __future__ import annotations

import argparse

from ..service import DialogueService


def cmd_serve(svc: DialogueService, a: argparse.Namespace) -> int:
    svc.close()
    from ..web import serve
    serve(db=a.db, host=a.host, port=a.port, open_browser=not a.no_browser, token=a.token)
    return 0


def _args_serve(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5001)
    sp.add_argument("--no-browser", action="store_true")
    sp.add_argument("--token", help="access token (generated when binding beyond localhost)")


COMMANDS = {"serve": (cmd_serve, "open the web app", _args_serve)}
