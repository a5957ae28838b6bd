"""Which kernel a dialogue runs in: the app's own interpreter (the default), an installed Jupyter
kernelspec (`jupyter kernelspec list`), or a Python interpreter given by its path.

A dialogue stores its choice in its meta under `KEY` as ``{"spec": NAME}``, ``{"python":
PATH}`` or ``{"gateway": NAME}`` (the kernelspec NAME of the gateway the config names: see
`remote`; the gateway's URL and token come only from the config, never from a dialogue); no key
means the default. `Choice.from_meta` reads it, `check` refuses a choice that
cannot run here (no such kernelspec; an interpreter that is missing or lacks ipykernel, with how to
install it). The kernelspecs listed are jupyter_client's own `KernelSpecManager` (the
directories of `jupyter --paths`, JUPYTER_PATH and JUPYTER_DATA_DIR included).

Whatever the choice, the kernel runs under our supervisor (see `process`); an ipykernel command
line (`python -m ipykernel_launcher -f ...`) runs our launcher with the same interpreter, so its
subprocess output pipe is private too.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["KEY", "Choice", "KernelChoiceError", "installed", "kernelspec_of", "check_python",
           "DEFAULT_LABEL", "PYTHON_SPEC", "default_language_info"]

KEY = "kernel"
DEFAULT_LABEL = "Python 3 (dialogue)"
# What a notebook says for a plain Python kernel: Jupyter's own name for it, so any Jupyter opens
# the file without asking which kernel to use.
PYTHON_SPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


class KernelChoiceError(ValueError):
    """A kernel that cannot be used here; the message says what to do instead."""


@dataclass(frozen=True)
class Choice:
    """A dialogue's kernel: `spec` (an installed kernelspec's name), `python` (an
    interpreter's path) or `gateway` (a kernelspec of the configured gateway, run there), or
    none: the app's own interpreter."""

    spec: str | None = None
    python: str | None = None
    gateway: str | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> "Choice":
        k = (meta or {}).get(KEY)
        if not isinstance(k, dict):
            return cls()
        spec, python, gateway = k.get("spec"), k.get("python"), k.get("gateway")
        return cls(spec if isinstance(spec, str) and spec else None,
                   python if isinstance(python, str) and python else None,
                   gateway if isinstance(gateway, str) and gateway else None)

    def to_meta(self) -> dict[str, str] | None:
        if self.spec:
            return {"spec": self.spec}
        if self.python:
            return {"python": self.python}
        if self.gateway:
            return {"gateway": self.gateway}
        return None

    @property
    def is_default(self) -> bool:
        return not (self.spec or self.python or self.gateway)

    def label(self) -> str:
        """How a page or the CLI names it."""
        if self.spec:
            try:
                return kernelspec_of(self.spec).display_name or self.spec
            except KernelChoiceError:
                return f"{self.spec} (not installed)"
        if self.python:
            return f"Python: {self.python}"
        if self.gateway:
            return f"{self.gateway} (gateway)"
        return DEFAULT_LABEL

    def kernelspec(self) -> dict[str, str]:
        """The notebook metadata `kernelspec` for this choice."""
        if self.spec:
            try:
                ks = kernelspec_of(self.spec)
                return {"name": self.spec, "display_name": ks.display_name or self.spec,
                        "language": ks.language or ""}
            except KernelChoiceError:
                return {"name": self.spec, "display_name": self.spec, "language": ""}
        if self.gateway:  # the same kernelspec name opens it in the gateway's Jupyter
            return {"name": self.gateway, "display_name": self.gateway, "language": ""}
        return dict(PYTHON_SPEC)

    def language(self) -> str:
        if self.spec:
            try:
                return kernelspec_of(self.spec).language or ""
            except KernelChoiceError:
                return ""
        if self.gateway:  # not known here before the remote kernel says (kernel_info)
            return ""
        return "python"


def _manager() -> Any:
    from jupyter_client.kernelspec import KernelSpecManager
    return KernelSpecManager()


def installed() -> dict[str, Any]:
    """{name: KernelSpec} of every kernelspec Jupyter finds here, by name."""
    ksm = _manager()
    out = {}
    for name in sorted(ksm.find_kernel_specs()):
        try:
            out[name] = ksm.get_kernel_spec(name)
        except Exception:  # a broken kernel.json: not a choice
            continue
    return out


def kernelspec_of(name: str) -> Any:
    """The installed kernelspec `name` (a jupyter_client KernelSpec)."""
    from jupyter_client.kernelspec import NoSuchKernel
    try:
        return _manager().get_kernel_spec(name)
    except NoSuchKernel:
        names = ", ".join(installed()) or "none"
        raise KernelChoiceError(f"no Jupyter kernel named {name!r} is installed here "
                                f"(installed: {names}; see `jupyter kernelspec list`)") from None
    except Exception as e:
        raise KernelChoiceError(f"the Jupyter kernel {name!r} cannot be read: {e}") from None


def check_python(path: str) -> str:
    """The absolute path of a Python interpreter that can run an ipykernel, or KernelChoiceError
    saying why not and how to fix it."""
    p = os.path.expanduser(path.strip())
    if not p:
        raise KernelChoiceError("give the path of a Python interpreter")
    if os.sep not in p:  # a bare name ("python3.12"): look it up on PATH
        p = shutil.which(p) or p
    p = os.path.abspath(p)
    if not os.path.isfile(p) or not os.access(p, os.X_OK):
        raise KernelChoiceError(f"{p} is not an executable file")
    try:
        r = subprocess.run([p, "-c", "import ipykernel, sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelChoiceError(f"{p} could not be run: {e}") from None
    if r.returncode != 0:
        if "No module named" in r.stderr and "ipykernel" in r.stderr:
            raise KernelChoiceError(f"{p} has no ipykernel; install it with: "
                                    f"{p} -m pip install ipykernel")
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise KernelChoiceError(f"{p} is not a Python that can run a kernel: {last}")
    return p


def kernel_argv(choice: Choice, launcher: str) -> tuple[list[str], dict[str, str], str, str]:
    """(kernel command line with {connection_file}, extra environment, interrupt mode, language)
    for `choice`. `launcher`: our ipykernel launcher script (see `inside/launcher.py`)."""
    if choice.spec:
        ks = kernelspec_of(choice.spec)
        argv = list(ks.argv)
        if argv and argv[0] in {"python", f"python{sys.version_info[0]}",
                                "python%i.%i" % sys.version_info[:2]}:
            argv[0] = sys.executable  # as jupyter_client does for the native kernel
        # an ipykernel command line: the same interpreter runs our launcher (the same
        # ipykernel_launcher, with its subprocess pipe in the private directory)
        for i, a in enumerate(argv[1:3], start=1):
            if a == "-m" and len(argv) > i + 1 and argv[i + 1] in ("ipykernel_launcher", "ipykernel"):
                argv = [argv[0], *argv[1:i], launcher, *argv[i + 2:]]
                break
        return argv, dict(ks.env or {}), ks.interrupt_mode or "signal", ks.language or ""
    python = choice.python or sys.executable
    return ([python, "-Xfrozen_modules=off", launcher, "-f", "{connection_file}"], {}, "signal",
            "python")


def default_language_info() -> dict[str, Any]:
    """What ipykernel reports as language_info for the app's own interpreter: the exported
    notebook's, when no kernel has run in this process."""
    return {"name": "python", "version": platform.python_version(), "mimetype": "text/x-python",
            "codemirror_mode": {"name": "ipython", "version": sys.version_info[0]},
            "pygments_lexer": f"ipython{sys.version_info[0]}", "nbconvert_exporter": "python",
            "file_extension": ".py"}
