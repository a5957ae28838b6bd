"""`dialogue adapters ...`: the adapter registry and adapter merging from the command line.

    dialogue adapters add PATH|REPO [--name N] [--base MODEL] [--copy] [--replace]
    dialogue adapters list [--json]
    dialogue adapters info NAME|PATH [--json]
    dialogue adapters rm NAME
    dialogue adapters merge A B ... --weights 0.5 0.5 --method linear|ties|dare --rank R --out NAME
    dialogue adapters use DIALOGUE [NAME[=SCALE] ...] [--clear]
    dialogue adapters compare DIALOGUE PROMPT --set NAME=SCALE,... --set none [--max-tokens N]

The command owns no logic: it parses arguments into the service's adapter calls (the registry
itself is `dialogue.local.adapters`). Mistakes (an unknown name, a file that does not fit the base)
print one line to stderr and exit 1. Names, paths and answers are printed through
`dialogue.terminal`, as in the rest of the CLI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from ..service import (Answer, ConflictError, DialogueService, ProviderError, RunError,
                       StoreError, follow)
from ..terminal import StreamWriter, markup, plain
from .progress import Bars

__all__ = ["adapters_main", "build_parser", "parse_set", "set_text", "COMMANDS"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dialogue adapters",
        description="LoRA adapters for local models: applied to the quantized base at run time, "
                    "switched and stacked per dialogue, merged into new adapters, never into models.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="register a GGUF LoRA file, a PEFT adapter directory, or a Hub repo")
    a.add_argument("source", metavar="PATH|REPO", help="file.gguf, a PEFT directory, owner/name or owner/name/file.gguf")
    a.add_argument("--name", help="registry name (default: from the file or directory name)")
    a.add_argument("--base", default="default", help="the local model it belongs to (default: the bundled one)")
    a.add_argument("--copy", action="store_true", help="keep a copy in the registry (the source may be deleted)")
    a.add_argument("--replace", action="store_true", help="replace an adapter registered under the same name")
    ls = sub.add_parser("list", help="registered adapters")
    ls.add_argument("--json", action="store_true")
    i = sub.add_parser("info", help="base, rank, alpha, targets, size and provenance of an adapter")
    i.add_argument("name", metavar="NAME|PATH")
    i.add_argument("--json", action="store_true")
    r = sub.add_parser("rm", help="forget an adapter (deletes the file only if the registry made it)")
    r.add_argument("name")
    m = sub.add_parser("merge", help="merge adapters into a new adapter")
    m.add_argument("parents", nargs="+", metavar="ADAPTER", help="registered names or .gguf paths")
    m.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    m.add_argument("--method", choices=("linear", "ties", "dare"), default="linear")
    m.add_argument("--rank", type=int, default=None,
                   help="rank of the result (default: sum of the parents' ranks for linear, the largest for ties/dare)")
    m.add_argument("--density", type=float, default=None, help="ties/dare: fraction of entries kept (default 0.5)")
    m.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    m.add_argument("--dtype", choices=("f16", "f32"), default="f16")
    m.add_argument("--out", required=True, metavar="NAME", help="name of the new adapter")
    m.add_argument("--replace", action="store_true")
    u = sub.add_parser("use", help="show or choose a dialogue's adapters (applied to its local model)")
    u.add_argument("dialogue")
    u.add_argument("adapters", nargs="*", metavar="NAME[=SCALE]",
                   help="the new set (replaces the old one); scale 1 when left out, 0 = listed but off")
    u.add_argument("--clear", action="store_true", help="no adapters: the bare base model")
    c = sub.add_parser("compare", help="answer one prompt under several adapter sets, side by side "
                                       "(nothing is stored)")
    c.add_argument("dialogue", help="the dialogue whose model and messages form the context")
    c.add_argument("prompt", help="the prompt ('-' reads stdin)")
    c.add_argument("--set", dest="sets", action="append", required=True, metavar="NAME=SCALE,...",
                   help="an adapter set; repeat for each set to compare; 'none' = the bare base")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--json", action="store_true")
    return p


def parse_set(spec: str | list[str]) -> dict[str, float]:
    """'sql=1,docs=0.5' (or a list of 'name=scale' items) -> {name: scale}; 'none' or '' -> {}.
    The scale is after the last '=' so a path may contain one; no scale means 1."""
    items = spec if isinstance(spec, list) else [x for x in spec.split(",")]
    out: dict[str, float] = {}
    for item in (x.strip() for x in items):
        if not item or item.lower() == "none":
            continue
        name, eq, scale = item.rpartition("=")
        if not eq:
            name, scale = item, "1"
        try:
            out[name.strip()] = float(scale)
        except ValueError:
            raise ValueError(f"bad adapter {item!r}: write NAME or NAME=SCALE with a number") from None
    return out


def set_text(adapters: dict[str, Any]) -> str:
    """An adapter set as the CLI prints it: `sql ×1, docs ×0.5`."""
    return ", ".join(f"{k} ×{v:g}" + (" (off)" if v == 0 else "") for k, v in adapters.items()) \
        or "none (the bare base)"


async def _compare(svc: DialogueService, dialogue: str, prompt: str, sets: list[dict[str, float]],
                   max_tokens: int | None, out: Console, as_json: bool) -> list[dict[str, Any]]:
    results = []
    model = svc.open(dialogue, messages=False).model
    for i, aset in enumerate(sets):
        label = chr(ord("A") + i) if i < 26 else str(i + 1)
        if not as_json:
            out.rule(f"{label}: {markup(set_text(aset))}")
        ans = Answer()
        stream = StreamWriter(out.file)
        shown = 0  # characters of the answer written so far
        async for _ in follow(svc.trial(dialogue, prompt, adapters=aset, max_tokens=max_tokens),
                              ans):
            if not as_json and len(ans.text) > shown:
                stream.write(ans.text[shown:])
                shown = len(ans.text)
        if ans.error:
            raise RunError(ans.error)
        usage = ans.record(model)
        if not as_json:
            stream.close()
            out.print(f"\n[dim]{usage['output']} tokens in {ans.seconds:.1f} s[/dim]")
        results.append({"set": aset, "answer": ans.text, "output_tokens": usage["output"],
                        "seconds": ans.seconds, "usage": usage})
    return results


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def adapters_main(argv: list[str], svc: DialogueService | None = None) -> int:
    """Entry point of `dialogue adapters`; returns the exit status. `use` and `compare` work on a
    dialogue and need a database (the CLI passes its service; without one the default database
    is opened)."""
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        if a.action == "add":
            with Bars(err) as bars:  # a PEFT conversion and a base's first scan take a while
                got = DialogueService.add_adapter(a.source, name=a.name, base=a.base, copy=a.copy,
                                                  replace=a.replace, on_progress=bars)
            how = {"peft": " (converted from PEFT)", "hub": " (from the Hub)"}.get(got.source, "")
            out.print(plain(f"added adapter {got.name}{how}: rank {got.rank}, {len(got.targets)} "
                            f"targets, {_size(got.size)}, for {got.base} -> {got.path}"))
        elif a.action == "list":
            items = DialogueService.list_adapters()
            if a.json:
                print(json.dumps([x.to_dict() for x in items], indent=2))
            elif not items:
                out.print("no adapters registered: `dialogue adapters add PATH|REPO`")
            else:
                t = Table("adapter", "base", "rank", "alpha", "size", "source", "trained on", box=None)
                for x in items:
                    prov = x.provenance
                    what = prov.get("dialogues") or prov.get("trained_on") or (
                        "merge" if "merge" in prov else "")
                    t.add_row(plain(x.name), plain(x.base), str(x.rank), f"{x.alpha:g}", _size(x.size),
                              plain(x.source), plain(what))
                out.print(t)
        elif a.action == "info":
            x = DialogueService.adapter_info(a.name)
            if a.json:
                print(json.dumps(x.to_dict(), indent=2))
            else:
                for k, v in x.to_dict().items():
                    if k == "size":
                        v = f"{_size(v)} ({v} bytes)"
                    elif k == "targets":
                        v = ", ".join(v)
                    elif k == "provenance":
                        v = json.dumps(v, indent=2, sort_keys=True) if v else "(not recorded)"
                    out.print(plain(f"{k + ':':12} {v}"))
        elif a.action == "rm":
            managed = DialogueService.remove_adapter(a.name)
            out.print(plain(f"removed adapter {a.name}"
                            + ("" if managed else " (the file itself is left alone)")))
        elif a.action == "merge":
            with Bars(err) as bars:  # one SVD per tensor for ties and dare
                got = DialogueService.merge_adapters(
                    a.parents, a.weights, a.out, method=a.method, rank=a.rank, density=a.density,
                    seed=a.seed, dtype=a.dtype, replace=a.replace, on_progress=bars)
            out.print(plain(f"merged {' + '.join(a.parents)} ({a.method}) into adapter {got.name}: "
                            f"rank {got.rank}, {_size(got.size)} -> {got.path}"))
        elif a.action in ("use", "compare"):
            if svc is None:
                svc = DialogueService()
            if a.action == "use":
                if a.clear and a.adapters:
                    raise ValueError("give adapters or --clear, not both")
                if a.clear or a.adapters:
                    svc.set_adapters(a.dialogue, parse_set(a.adapters))
                d = svc.open(a.dialogue)
                out.print(plain(f"{d.name} ({d.model}): adapters "
                                f"{set_text(d.meta.get('adapters') or {})}"))
            else:
                prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
                res = asyncio.run(_compare(svc, a.dialogue, prompt, [parse_set(x) for x in a.sets],
                                           a.max_tokens, out, a.json))
                if a.json:
                    print(json.dumps(res, indent=2))
        return 0
    except (ProviderError, ValueError, OSError, StoreError) as e:  # AdapterError is a ProviderError
        err.print(plain(f"error: {e}"))
        return 3 if isinstance(e, ConflictError) else 1


def cmd_adapters(svc: DialogueService, a: argparse.Namespace) -> int:
    return adapters_main(a.args, svc)


def _args_adapters(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("args", nargs=argparse.REMAINDER)


COMMANDS = {
    "adapters": (cmd_adapters, "LoRA adapters for local models: add, list, info, rm, merge",
                 _args_adapters),
}
