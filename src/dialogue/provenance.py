"""What produced an answer, and replaying it.

`produced_by(request, provider, adapters)` is recorded with every answer (`meta["provenance"]`)
when it is sent: the model name and, for a local model, its file and content hash; the adapter
set as the user named it and each file with its hash and scale; the sampling settings (max
tokens, temperature, seed, a local model's repetition settings); the tools offered and where
each runs; and the package version. `finish(prov, answer)` adds what only the end knows: the
tools the model called and the prompt tokens read from a cache.

`compare(stored, replayed, then, now)` is a replay's verdict: whether the regenerated text is the
stored one, a unified diff when not, and each setting that differs between the answer's record
and the replay's (a model file replaced under the same name, an adapter changed, different
sampling), so a difference can be told from non-determinism. A replay offers no tools: running
them again would change the dialogue or the world, so an answer that called tools is replayed
without them and says so.

Hashes come from `gguf.models.model_hash` (sampled, cached per process by path, size and mtime):
milliseconds for a model of hundreds of MB.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from .history import source_diff
from .llm.base import Request

__all__ = ["produced_by", "finish", "compare", "replay_settings"]

_SETTINGS = ("max_tokens", "temperature", "seed", "sampling")


def produced_by(request: Request, provider: Any, adapters: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """The provenance of the answer `request` is about to produce (see the module docstring).
    Reads two small samples of each model and adapter file: call it off the event loop."""
    from . import __version__
    from .gguf.models import model_hash_or_none as _hash
    out: dict[str, Any] = {"model": request.model, "dialogue_version": __version__}
    spec = getattr(provider, "spec", None)
    path = getattr(spec, "path", None)
    if path:
        out["model_file"] = os.path.basename(str(path))
        out["model_hash"] = _hash(str(path))
    files = request.meta.get("adapters") or {}
    if files:
        out["adapters"] = {"set": dict(adapters or {}),
                           "files": [{"file": os.path.basename(p), "path": p, "hash": _hash(p),
                                      "scale": float(s)} for p, s in files.items()]}
    out["sampling"] = {"max_tokens": request.max_tokens, "temperature": request.temperature,
                       "seed": request.meta.get("seed"),
                       "sampling": request.meta.get("sampling")}
    if request.prefill:
        out["prefill"] = request.prefill
    out["tools_offered"] = [{"name": t.name, "source": t.source} for t in request.tools]
    return out


def finish(prov: dict[str, Any], tool_calls: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
    """`prov` with the end of the answer: tools called (in order) and prompt tokens read from a
    cache (the provider's own count)."""
    return {**prov, "tools_called": [c.get("name", "") for c in tool_calls],
            "cache_read": int(getattr(usage, "cache_read", 0) or 0)}


def replay_settings(prov: Mapping[str, Any]) -> dict[str, Any]:
    """The request settings a replay reuses from an answer's provenance."""
    s = prov.get("sampling") or {}
    return {k: s.get(k) for k in _SETTINGS}


def compare(stored: str, replayed: str, then: Mapping[str, Any] | None,
            now: Mapping[str, Any]) -> dict[str, Any]:
    """A replay's verdict: {"same", "diff", "stored", "replayed", "changes", "notes"}.

    `then` is the stored answer's provenance (None for an answer recorded before provenance
    was kept: nothing to compare settings with, said in a note); `now` the replay's."""
    notes: list[str] = []
    changes: list[dict[str, Any]] = []

    def change(what: str, a: Any, b: Any) -> None:
        changes.append({"what": what, "then": a, "now": b})

    if then is None:
        notes.append("this answer was stored before provenance was recorded: the replay uses "
                     "the dialogue's current settings")
        then = {}
    else:
        for key in ("model", "model_hash"):
            if then.get(key) != now.get(key):
                change(key, then.get(key), now.get(key))
        a = {f["path"]: (f.get("hash"), f.get("scale")) for f in (then.get("adapters") or {}).get("files", [])}
        b = {f["path"]: (f.get("hash"), f.get("scale")) for f in (now.get("adapters") or {}).get("files", [])}
        for p in sorted(set(a) | set(b)):
            if a.get(p) != b.get(p):
                change(f"adapter {os.path.basename(p)}", a.get(p), b.get(p))
        for k in _SETTINGS:
            x, y = (then.get("sampling") or {}).get(k), (now.get("sampling") or {}).get(k)
            if x != y:
                change(k, x, y)
        if then.get("tools_called"):
            notes.append("the answer called tools (" + ", ".join(then["tools_called"]) + "); the "
                         "replay offers none, so it can only match up to the first call")
    temp = (now.get("sampling") or {}).get("temperature")
    if temp not in (None, 0, 0.0) and (now.get("sampling") or {}).get("seed") is None:
        notes.append(f"sampled at temperature {temp} without a seed: a different answer is expected")
    same = stored == replayed
    diff = source_diff(stored, replayed, old="stored", new="replayed")
    return {"same": same, "diff": diff, "stored": stored, "replayed": replayed,
            "changes": changes, "notes": notes}
