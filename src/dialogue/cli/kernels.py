"""`dialogue kernel`: the Jupyter kernels installed here, and which one runs a dialogue's code."""
from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..service import DialogueService
from ..terminal import markup, plain
from .common import UserError, out


def cmd_kernel(svc: DialogueService, a: argparse.Namespace) -> None:
    """Without NAME: the installed kernels (and the configured gateway's). With NAME: its
    kernel; with SPEC, --python PATH, --gateway SPEC or --default as well: choose it (checked
    now; the next run starts it)."""
    specs = svc.kernel_specs()
    given = (a.spec is not None, a.python is not None, a.gateway is not None, a.default)
    change = any(given)
    if sum(given) > 1:
        raise UserError("give one of SPEC, --python PATH, --gateway SPEC or --default")
    if not a.name:
        if change:
            raise UserError("name the dialogue: dialogue kernel NAME SPEC")
        remote, remote_error = _gateway_specs(svc)
        if a.json:
            print(json.dumps({"installed": specs, "gateway": remote,
                              **({"gateway_error": remote_error} if remote_error else {})}))
            return
        t = Table("kernelspec", "display name", "where", box=None)
        for name, label in specs.items():
            t.add_row(plain(name), plain(label), "here")
        for name, label in remote.items():
            t.add_row(plain(name), plain(label), "gateway")
        out.print(t)
        if remote_error:
            out.print(f"[yellow]the gateway's kernels are not listed: {markup(remote_error)}[/yellow]")
        out.print("[dim]a dialogue runs in the app's own Python unless it chooses one of these "
                  "(dialogue kernel NAME SPEC; on the gateway: dialogue kernel NAME --gateway "
                  "SPEC) or an interpreter (dialogue kernel NAME --python PATH)[/dim]")
        return
    if change:
        d = svc.set_kernel(a.name, a.spec, python=a.python, gateway=a.gateway)
    else:
        d = svc.open(a.name, messages=False)
    choice = svc.kernel_choice(d)
    if a.json:
        print(json.dumps({"dialogue": d.name, "kernel": choice.to_meta(), "label": choice.label(),
                          "installed": specs}))
        return
    out.print(f"dialogue [b]{markup(d.name)}[/b]: kernel {markup(choice.label())}"
              + (" (the next run starts it)" if change else ""))


def _gateway_specs(svc: DialogueService) -> tuple[dict[str, str], str | None]:
    """The configured gateway's kernels ({} when none is configured), or why they cannot be
    listed (the local list is still shown)."""
    try:
        return svc.gateway_specs(), None
    except ValueError as e:  # GatewayError: not configured right, unreachable, refusing
        return {}, str(e)


def _args_kernel(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", nargs="?", help="the dialogue (without it: list the installed kernels)")
    sp.add_argument("spec", nargs="?", help="an installed kernelspec's name (jupyter kernelspec list)")
    sp.add_argument("--python", metavar="PATH", help="a Python interpreter with ipykernel")
    sp.add_argument("--gateway", metavar="SPEC",
                    help="a kernelspec of the gateway the config names (gateway_url), run there")
    sp.add_argument("--default", action="store_true", help="back to the app's own Python")
    sp.add_argument("--json", action="store_true")


COMMANDS = {
    "kernel": (cmd_kernel, "list the installed Jupyter kernels, or show or choose the one that "
                           "runs a dialogue's code", _args_kernel),
}
