"""Real second Python environments and Jupyter kernelspecs for the kernel-choice tests."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path


def make_venv(root: Path, *, with_ipykernel: bool) -> str:
    """A real second interpreter: a venv (no pip, so it takes a second); its python's path.
    With `with_ipykernel`, a .pth file puts this environment's site-packages on its path, so it
    can import ipykernel (as `python -m venv --system-site-packages` would from a system Python
    that has it)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    if with_ipykernel:
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "app-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(py)


def write_kernelspec(jupyter_dir: Path, name: str, python: str, display_name: str,
                     env: dict[str, str] | None = None) -> Path:
    """A kernelspec `name` under `jupyter_dir`/kernels (a JUPYTER_PATH entry) with the usual
    ipykernel command line, run by `python`."""
    kdir = jupyter_dir / "kernels" / name
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name, "language": "python", "env": env or {}}))
    return kdir
