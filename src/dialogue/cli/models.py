"""Models and the local model's prefix cache: `dialogue models [list|add|rm]`, `dialogue cache`."""
from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ..service import DialogueService
from ..terminal import plain
from .common import UserError, emit_json, out, when


def cmd_models(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.action == "add":
        if not a.target:
            raise UserError("give a .gguf path, or a Hugging Face repo id and a file name")
        if a.file:  # REPO FILE: download (needs network; only on this explicit request)
            spec = svc.add_model_from_hub(a.target, a.file, name=a.name, chat_format=a.chat_format)
        else:
            spec = svc.add_model(a.target, name=a.name, chat_format=a.chat_format)
        out.print(plain(f"added local:{spec.name} -> {spec.path}"))
        return
    if a.action == "rm":
        if not a.target:
            raise UserError("give the name of the model to remove")
        svc.remove_model(a.target)
        out.print(plain(f"removed local:{a.target} (the file itself is left alone)"))
        return
    if a.json:
        emit_json(svc.models())
        return
    t = Table(box=None)
    t.add_column("model", overflow="fold")  # a name is never cut: it is what one types
    t.add_column("where", overflow="fold")
    t.add_column("about")
    t.add_column("runs on")
    t.add_column("images")  # whether it sees images in notes and prompts
    for m in svc.models():
        t.add_row(plain(m.name), plain(m.where), plain(m.about), plain(m.device or "remote API"),
                  "yes" if m.images else "", style=None if m.ready or m.template else "dim")
    out.print(t)


def cmd_cache(svc: DialogueService, a: argparse.Namespace) -> None:
    if a.action == "clear":
        n, root = svc.clear_cache()
        out.print(plain(f"deleted {n} cached prefix states from {root}"))
        return
    st = svc.cache_stats()
    if a.json:
        import dataclasses
        emit_json({**dataclasses.asdict(st), "lookups": st.lookups, "hit_rate": st.hit_rate})
        return
    out.print(plain(f"{st.root}: {st.entries} states, {st.bytes / 1e6:.1f} MB of "
                    f"{st.max_bytes / 1e6:.0f} MB"))
    out.print(plain(cache_use(st)))
    for ns in st.namespaces:
        info = ns.get("info", {})
        what = info.get("model") or info.get("model_path") or ns["namespace"]
        adapters = info.get("adapters") or {}
        if adapters:  # two sets of one model are two caches: say which is which
            what += " + " + ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else str(k)
                                      for k, v in sorted(dict(adapters).items()))
        out.print(plain(f"  {what}: {ns['entries']} states, {ns['bytes'] / 1e6:.1f} MB, "
                        f"longest prefix {ns['longest']} tokens"))
        t = Table("tokens", "size", "last used", "saved for", box=None, padding=(0, 1, 0, 4))
        for p in ns.get("prefixes", []):
            t.add_row(f"{p['tokens']:,}", f"{p['bytes'] / 1e6:.1f} MB", when(p["last_used"]),
                      plain(p.get("dialogue") or "(unknown dialogue)"))
        if ns.get("prefixes"):
            out.print(t)


def cache_use(st: Any) -> str:
    """How often prompts found a saved prefix, counted by every process using the cache."""
    if not st.lookups:
        return "no lookups yet (a local model's prompt looks for a saved prefix)"
    since = f" since {when(st.since)}" if st.since else ""
    return (f"hit rate {st.hit_rate:.0%}: {st.hits:,} of {st.lookups:,} lookups found a saved prefix{since}; "
            f"{st.saves:,} saved, {st.evicted:,} evicted, {st.corrupt:,} damaged")


def _args_models(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", nargs="?", choices=("list", "add", "rm"), default="list")
    sp.add_argument("target", nargs="?", metavar="PATH.gguf|REPO|NAME")
    sp.add_argument("file", nargs="?", metavar="FILE.gguf", help="file in the Hub repository")
    sp.add_argument("--name")
    sp.add_argument("--chat-format", help="llama.cpp chat format, for files without a template")
    sp.add_argument("--json", action="store_true", help="list: print the models as JSON")


def _args_cache(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", nargs="?", choices=("stats", "clear"), default="stats")
    sp.add_argument("--json", action="store_true", help="stats: print them as JSON")


COMMANDS = {
    "models": (cmd_models, "list local and API models; add or remove local ones", _args_models),
    "cache": (cmd_cache, "show or empty the local model's prefix KV cache", _args_cache),
}
