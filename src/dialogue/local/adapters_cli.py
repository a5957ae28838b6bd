"""`dialogue adapters ...`: the adapter registry and adapter merging from the command line.

    dialogue adapters add PATH|REPO [--name N] [--base MODEL] [--copy] [--replace]
    dialogue adapters list [--json]
    dialogue adapters info NAME|PATH [--json]
    dialogue adapters rm NAME
    dialogue adapters merge A B ... --weights 0.5 0.5 --method linear|ties|dare --rank R --out NAME

The command owns no logic: it parses arguments into `dialogue.local.adapters` calls. Mistakes
(an unknown name, a file that does not fit the base) print one line to stderr and exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from ..llm.base import ProviderError

__all__ = ["adapters_main", "build_parser"]


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
    return p


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def adapters_main(argv: list[str]) -> int:
    """Entry point of `dialogue adapters`; returns the exit status."""
    from . import adapters as A

    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        if a.action == "add":
            if a.copy:
                got = A.copy_into_registry(a.source, a.name, base=a.base, replace=a.replace)
            else:
                got = A.add(a.source, a.name, base=a.base, replace=a.replace)
            how = {"peft": " (converted from PEFT)", "hub": " (from the Hub)"}.get(got.source, "")
            out.print(f"added adapter {got.name}{how}: rank {got.rank}, {len(got.targets)} targets, "
                      f"{_size(got.size)}, for {got.base} -> {got.path}", markup=False)
        elif a.action == "list":
            items = A.list_adapters()
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
                    t.add_row(x.name, x.base, str(x.rank), f"{x.alpha:g}", _size(x.size), x.source, str(what))
                out.print(t)
        elif a.action == "info":
            x = A.info(a.name)
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
                    out.print(f"{k + ':':12} {v}", markup=False)
        elif a.action == "rm":
            managed = A.info(a.name).managed if a.name in {x.name for x in A.list_adapters()} else False
            A.remove(a.name)
            out.print(f"removed adapter {a.name}" + ("" if managed else " (the file itself is left alone)"))
        elif a.action == "merge":
            got = A.merge(a.parents, a.weights, a.out, method=a.method, rank=a.rank, density=a.density,
                          seed=a.seed, dtype=a.dtype, replace=a.replace)
            out.print(f"merged {' + '.join(a.parents)} ({a.method}) into adapter {got.name}: rank {got.rank}, "
                      f"{_size(got.size)} -> {got.path}", markup=False)
        return 0
    except (ProviderError, ValueError, OSError) as e:  # AdapterError is a ProviderError
        err.print(f"error: {e}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(adapters_main(sys.argv[1:]))
