"""Every URL of the app, named once.

A route is declared with its `Route` (`@rt(paths.run_cell)`) and every link to it is made from
the same object (`paths.run_cell.to(did=..., mid=...)`), so a path is written in one place and a
link cannot drift from the route it names. The views make links without importing the routes
(which import the views); a route handler has the same `.to()` (FastHTML gives its handlers one),
so a test can name a route by its handler.

Names: "run" alone is one message's run (`run_cell`, `stop_cell`, `cell_stream`); a dialogue top
to bottom is "run all"; an answer under an adapter set that is stored nowhere is a "trial" (the
page's button says "Compare…": the user compares two trials side by side).
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlencode

__all__ = ["Route"]

_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


class Route(str):
    """A route's path pattern (`/d/{did}/m/{mid}`), usable wherever a string is."""

    @property
    def params(self) -> list[str]:
        return _PARAM.findall(self)

    def to(self, **values: Any) -> str:
        """The URL for these values: each `{name}` of the pattern filled in (escaped), the rest
        sent as a query string. A missing path parameter is a bug, and raises KeyError."""
        names = set(self.params)
        missing = names - values.keys()
        if missing:
            raise KeyError(f"{self} needs {', '.join(sorted(missing))}")
        url = _PARAM.sub(lambda m: quote(str(values[m.group(1)]), safe=""), self)
        query = {k: v for k, v in values.items() if k not in names and v is not None}
        return f"{url}?{urlencode(query)}" if query else url


# ---------------------------------------------------------------- the app
health = Route("/health")
healthz = Route("/healthz")  # for supervisors and proxies: no token (security.PUBLIC_PATHS)
static = Route("/static/{path:path}")
highlight_css = Route("/static/highlight.css")

# ---------------------------------------------------------------- dialogues (routes/dialogues.py)
index = Route("/")
search = Route("/search")
new = Route("/new")
import_notebook = Route("/import")
# a long step started from the page (routes/progress.py): the box, then its event stream
progress_box = Route("/progress/{job}")
progress_stream = Route("/progress/{job}/stream")
# numbers as pictures (routes/stats.py)
training = Route("/training")
training_run = Route("/training/{rid}")
cache = Route("/cache")
dialogue = Route("/d/{did}")
row = Route("/d/{did}/row")
rename = Route("/d/{did}/rename")
delete = Route("/d/{did}/delete")
restore = Route("/d/{did}/restore")
export = Route("/d/{did}/export/{fmt}")
move_to = Route("/d/{did}/move_to")  # into a folder (routes/folders.py)
# folders (routes/folders.py): make one, its settings (path, note, template), delete it
folders = Route("/folders")
folder = Route("/folders/{fid}")
folder_delete = Route("/folders/{fid}/delete")

# ---------------------------------------------------------------- settings (routes/settings.py)
settings = Route("/d/{did}/settings")
context = Route("/d/{did}/context")
context_status = Route("/d/{did}/context/status")
kernel = Route("/d/{did}/kernel")
kernel_interrupt = Route("/d/{did}/kernel/interrupt")
kernel_restart = Route("/d/{did}/kernel/restart")
kernel_choice = Route("/d/{did}/kernel/choice")
mcp = Route("/d/{did}/mcp")  # its MCP servers (routes/mcp.py); POST switches one on or off
mcp_tools = Route("/d/{did}/mcp/tools")  # ?name=: one server's tools (starting it)

# ---------------------------------------------------------------- cells (routes/cells.py)
cells = Route("/d/{did}/cells")
cell = Route("/d/{did}/m/{mid}")
save = Route("/d/{did}/m/{mid}/save")
kind = Route("/d/{did}/m/{mid}/kind")
flag = Route("/d/{did}/m/{mid}/flag")
move = Route("/d/{did}/m/{mid}/move")
delete_cell = Route("/d/{did}/m/{mid}/delete")
undelete = Route("/d/{did}/m/{mid}/undelete")
answer = Route("/d/{did}/m/{mid}/answer")
history = Route("/d/{did}/m/{mid}/history")
replay = Route("/d/{did}/m/{mid}/replay")  # an answer again, under its recorded settings
restore_version = Route("/d/{did}/m/{mid}/restore_version")
images = Route("/d/{did}/m/{mid}/images")  # paste, drop or upload images into a note or prompt
request_panel = Route("/d/{did}/m/{mid}/request")  # what an answer was sent with
estimate = Route("/d/{did}/m/{mid}/estimate")  # what a prompt would send now
fork = Route("/d/{did}/m/{mid}/fork")
merge = Route("/d/{did}/m/{mid}/merge")
split = Route("/d/{did}/m/{mid}/split")

# ---------------------------------------------------------------- runs (routes/runs.py)
run_cell = Route("/d/{did}/m/{mid}/run")
stop_cell = Route("/d/{did}/m/{mid}/stop")
cell_stream = Route("/d/{did}/m/{mid}/stream")
cell_input = Route("/d/{did}/m/{mid}/input")
cell_approve = Route("/d/{did}/m/{mid}/approve")  # answer a tool call waiting for approval
run_all = Route("/d/{did}/run_all")
stop_all = Route("/d/{did}/run_all/stop")
run_all_stream = Route("/d/{did}/run_all/stream")

# ---------------------------------------------------------------- adapters (routes/adapters.py)
adapters = Route("/d/{did}/adapters")
trial_dialog = Route("/d/{did}/compare")
trials = Route("/d/{did}/trials")
trial_stream = Route("/d/{did}/trials/{tid}/stream")
keep_trial = Route("/d/{did}/trials/{tid}/keep")
use_trial = Route("/d/{did}/trials/{tid}/use")
