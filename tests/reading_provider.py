"""A stand-in model that reads its prompt the way the local model reports it (one `Progress` per
chunk of prompt tokens, with an estimate of the time left), then answers. The surfaces' tests (web
cell, CLI) use it: what they test is how progress is shown, not how a model computes it.

The model name carries its behaviour: `test-reading:total=512,chunk=128,delay=0.05,rate=100,
gate=PATH` reads 512 tokens in 128-token chunks, `delay` seconds apiece, estimating the time left
at `rate` tokens a second (no estimate after the first chunk), then waits until the file PATH
exists (if given) before it answers "The answer is 4." in three pieces.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

from dialogue.llm import base

PREFIX = "test-reading:"
ANSWER = ("The answer", " is", " 4.")


class ReadingProvider:
    name = "test-reading"
    context_window = None

    def __init__(self, model: str):
        opts = dict(kv.split("=", 1) for kv in model[len(PREFIX):].split(",") if "=" in kv)
        self.total = int(opts.get("total", 512))
        self.chunk = int(opts.get("chunk", 128))
        self.delay = float(opts.get("delay", 0.05))
        self.rate = float(opts.get("rate", 100))
        self.gate = opts.get("gate")

    def count_tokens(self, text: str) -> int | None:
        return None

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        read = 0
        while read < self.total:
            read = min(self.total, read + self.chunk)
            eta = (self.total - read) / self.rate if read > self.chunk else None
            yield base.Progress(read, self.total, eta)
            await asyncio.sleep(self.delay)
        while self.gate and not os.path.exists(self.gate):
            await asyncio.sleep(0.02)
        for piece in ANSWER:
            yield base.TextDelta(piece)
        yield base.Usage(self.total, len(ANSWER))
        yield base.Done("end")


def install() -> None:
    """Register the stand-in (idempotent), for this process only."""
    base._load_builtin()  # so a later lazy load cannot reorder the registry under us
    if PREFIX not in base.known_prefixes():
        base.register(PREFIX, ReadingProvider)
