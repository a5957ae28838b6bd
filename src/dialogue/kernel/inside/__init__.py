"""Code that runs inside the kernel process, kept as real files so it is linted, tested and named
in tracebacks like any other code. The app never imports these modules (they need IPython, or
each other under the names they get in the kernel); it reads their text (`source`) and sends it:

- `launcher.py`: what the kernel process runs (ipykernel's launcher, with its subprocess-output
  pipe moved onto an IPC socket in the kernel's private directory).
- `helpers.py`: installed in every kernel as the module `_dialogue_kernel` (`Raw`, `shell`).
- `tools.py`: installed as `_dialogue_tools` when a prompt offers kernel functions as tools.

This file is the only one here that runs in the app.
"""
from __future__ import annotations

import functools
from importlib.resources import files

__all__ = ["source", "path"]


def path(name: str) -> str:
    """The file of inside module `name`, for a process that runs it as a script and for the
    tracebacks of code compiled from it."""
    return str(files(__name__).joinpath(f"{name}.py"))


@functools.cache
def source(name: str) -> str:
    """The text of inside module `name` ("helpers", "tools", "launcher")."""
    return files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")
