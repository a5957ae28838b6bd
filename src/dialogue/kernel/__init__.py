"""IPython kernels for dialogues: one package, one module per idea.

- `kernel`: the Kernel (lifecycle, running code, silent calls), its errors and RunResult.
- `outputs`: the output cap, and `fold_output`, the one place that applies `clear_output` and
  `update_display_data` to a list of outputs.
- `process`: launching a kernel in a private IPC directory under `supervisor`, the process that
  ends everything the kernel starts; the exit hooks that end kernels with the app.
- `pool`: KernelPool, kernels by dialogue id.
- `remote`: RemoteKernel, a Kernel on a Jupyter Server or Kernel Gateway (REST + websocket).
- `inside/`: code that runs inside the kernel, as real files read and sent as text.

The names below load their module on first use: `outputs` needs only the standard library,
while `kernel`, `process` and `pool` import jupyter_client, which is slow to import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kernel import (Execution, ExecutionError, Kernel, KernelDied, KernelError,
                         KernelStartError, KernelTimeout, RunResult, Status)
    from .outputs import DEFAULT_OUTPUT_CAP, fold_output
    from .pool import KernelPool
    from .remote import Gateway, GatewayError, RemoteKernel

_HOME = {
    "Kernel": "kernel", "Execution": "kernel", "RunResult": "kernel", "Status": "kernel",
    "KernelError": "kernel", "KernelStartError": "kernel", "KernelDied": "kernel",
    "KernelTimeout": "kernel", "ExecutionError": "kernel",
    "KernelPool": "pool",
    "RemoteKernel": "remote", "Gateway": "remote", "GatewayError": "remote",
    "DEFAULT_OUTPUT_CAP": "outputs", "fold_output": "outputs",
}

__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
