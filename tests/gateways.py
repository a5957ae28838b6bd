"""Real kernel gateways for the remote-kernel tests, on 127.0.0.1 with a token: the Jupyter
Kernel Gateway (`jupyter_kernel_gateway`) or jupyter_server itself (whose REST and websocket
kernel API is the one gateways speak)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "s3cret-gw-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, kind: str = "kernel_gateway", token: str = TOKEN) -> tuple[str, subprocess.Popen]:
    """(its URL, its process), once it answers GET /api/kernelspecs with the token."""
    port = free_port()
    args = {"kernel_gateway": ["--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}",
                               f"--KernelGatewayApp.auth_token={token}",
                               "--JupyterWebsocketPersonality.list_kernels=True"],
            "jupyter_server": ["--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
                               "--no-browser", "--allow-root", f"--ServerApp.root_dir={tmp}"]}[kind]
    log = tmp / f"{kind}.log"
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-m", kind, *args], stdout=out,
                             stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
                             env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while True:
        try:
            r = httpx.get(f"{url}/api/kernelspecs", headers={"Authorization": f"token {token}"})
            if r.status_code == 200:
                return url, p
        except httpx.HTTPError:
            pass
        if p.poll() is not None or time.monotonic() > end:
            stop(p)
            raise RuntimeError(f"the {kind} did not start:\n{log.read_text()}")
        time.sleep(0.1)


def stop(p: subprocess.Popen) -> None:
    """The gateway and the kernels it started (its own process group)."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def kernels(url: str, token: str = TOKEN) -> list[dict]:
    """The gateway's running kernels."""
    return httpx.get(f"{url}/api/kernels", headers={"Authorization": f"token {token}"}).json()
