"""The app's routes, one module-level router per area; `create_app` adds them all.

Each handler is a plain module-level function: it can be imported and called alone, and its
`.to(...)` makes a link to it (the paths themselves are named once, in `web.paths`). A handler
finds the server's state with `common.site(req)`."""
from __future__ import annotations

from . import adapters, cells, dialogues, folders, mcp, progress, replay, requests, runs, settings, stats

ROUTERS = (dialogues.rt, folders.rt, settings.rt, adapters.rt, runs.rt, cells.rt, progress.rt, stats.rt,
           requests.rt, replay.rt, mcp.rt)

__all__ = ["ROUTERS", "adapters", "cells", "dialogues", "folders", "mcp", "progress", "replay", "requests", "runs", "settings", "stats"]
