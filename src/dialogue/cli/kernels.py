"""`dialogue kernel`: the Jupyter kernels installed here, and which one runs a dialogue's code."""
from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..service import DialogueService
from ..terminal import markup, plain
from .common import UserError, out


def cmd_kernel(svc: DialogueService, a: argparse.Namespace) -> None:
    """Without NAME: the installed kernels. With NAME: its kernel; with SPEC, --python PATH or
    --default as well: choose it (checked now; the next run starts it)."""
    specs = svc.kernel_specs()
    change = a.spec is not None or a.python is not None or a.default
    if sum((a.spec is not None, a.python is not None, a.default)) > 1:
        raise UserError("give one of SPEC, --python PATH or --default")
    if not a.name:
        if change:
            raise UserError("name the dialogue: dialogue kernel NAME SPEC")
        if a.json:
            print(json.dumps({"installed": specs}))
            return
        t = Table("kernelspec", "display name", box=None)
        for name, label in specs.items():
            t.add_row(plain(name), plain(label))
        out.print(t)
        out.print("[dim]a dialogue runs in the app's own Python unless it chooses one of these "
                  "(dialogue kernel NAME SPEC) or an interpreter (dialogue kernel NAME --python "
                  "PATH)[/dim]")
        return
    if change:
        d = svc.set_kernel(a.name, a.spec, python=a.python)
    else:
        d = svc.open(a.name, messages=False)
    choice = svc.kernel_choice(d)
    if a.json:
        print(json.dumps({"dialogue": d.name, "kernel": choice.to_meta(), "label": choice.label(),
                          "installed": specs}))
        return
    out.print(f"dialogue [b]{markup(d.name)}[/b]: kernel {markup(choice.label())}"
              + (" (the next run starts it)" if change else ""))


def _args_kernel(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", nargs="?", help="the dialogue (without it: list the installed kernels)")
    sp.add_argument("spec", nargs="?", help="an installed kernelspec's name (jupyter kernelspec list)")
    sp.add_argument("--python", metavar="PATH", help="a Python interpreter with ipykernel")
    sp.add_argument("--default", action="store_true", help="back to the app's own Python")
    sp.add_argument("--json", action="store_true")


COMMANDS = {
    "kernel": (cmd_kernel, "list the installed Jupyter kernels, or show or choose the one that "
                           "runs a dialogue's code", _args_kernel),
}
