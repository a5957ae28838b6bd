"""Kernels by dialogue id: started on first use, shut down when idle or all at once."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from .kernel import Kernel

__all__ = ["KernelPool"]


class KernelPool:
    """Kernels by dialogue id: started on first use, shut down after `idle_timeout` seconds
    without a run (None: never), all shut down by `shutdown_all` (and, failing that, by the
    exit hooks every Kernel registers)."""

    def __init__(self, *, idle_timeout: float | None = 3600.0, check_every: float | None = None,
                 **kernel_options: Any):
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        self.idle_timeout = idle_timeout
        self.check_every = check_every or (min(60.0, idle_timeout / 4) if idle_timeout else None)
        self.kernel_options = kernel_options
        self._kernels: dict[str, Kernel] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None

    def __contains__(self, dialogue_id: str) -> bool:
        return dialogue_id in self._kernels

    def __len__(self) -> int:
        return len(self._kernels)

    def ids(self) -> list[str]:
        return list(self._kernels)

    def peek(self, dialogue_id: str) -> Kernel | None:
        """The dialogue's kernel if it has one, without starting anything."""
        return self._kernels.get(dialogue_id)

    async def get(self, dialogue_id: str, **options: Any) -> Kernel:
        """The dialogue's kernel, started if need be. `options` (Kernel arguments, such as cwd)
        apply when the kernel is created; a `choice` (specs.Choice) other than the running
        kernel's replaces it (the dialogue chose another kernel since)."""
        if not dialogue_id:
            raise ValueError("a dialogue id is required")
        async with self._lock:
            k = self._kernels.get(dialogue_id)
            if k is not None and "choice" in options and _same(k.choice) != _same(options["choice"]):
                del self._kernels[dialogue_id]
                await k.shutdown()
                k = None
            if k is None:
                opts = {**self.kernel_options, **options}
                cls = Kernel
                if getattr(opts.get("choice"), "gateway", None):  # a kernel on the gateway
                    from .remote import RemoteKernel
                    cls = RemoteKernel
                k = cls(name=dialogue_id, **opts)
                self._kernels[dialogue_id] = k
            self._start_reaper()
        await k.start()
        return k

    def _start_reaper(self) -> None:
        if self.check_every is None or (self._reaper is not None and not self._reaper.done()):
            return
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            await self.reap_idle()

    async def reap_idle(self) -> list[str]:
        """Shut down kernels idle for longer than idle_timeout; returns their dialogue ids."""
        if self.idle_timeout is None:
            return []
        now = time.monotonic()
        idle = [i for i, k in self._kernels.items()
                if not k.busy and now - k.last_used > self.idle_timeout]
        for i in idle:
            await self.shutdown(i)
        return idle

    async def shutdown(self, dialogue_id: str) -> None:
        k = self._kernels.pop(dialogue_id, None)
        if k is not None:
            await k.shutdown()

    async def shutdown_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        ks = list(self._kernels.values())
        self._kernels.clear()
        await asyncio.gather(*(k.shutdown() for k in ks), return_exceptions=True)


def _same(choice: Any) -> Any:
    """A kernel choice to compare: None and the default Choice are the same kernel."""
    return None if choice is None or choice.is_default else choice
