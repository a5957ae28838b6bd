"""Run as a script in a separate, isolated interpreter (`python -I _pkgdocs.py NAME [PATH...]`) by
`dialogue.sources.read_package`: prints one JSON line documenting the installed package NAME
(a distribution or an import name). Standard library only; imports nothing of dialogue.

Importing a package runs its code, which is why this runs in its own process: a module that
hangs, prints, exits or crashes ends this process, not the app. Modules and members whose names
start with "_", test modules and `__main__` are left out; a module that fails to import is listed
under "skipped" with its error.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import time
import warnings

MAX_MODULES = 300
MAX_API_CHARS = 1_500_000
MAX_DOC_CHARS = 4_000     # one docstring
TIME_LIMIT_S = 60.0
_SKIP_PARTS = re.compile(r"^(_.*|tests?|testing|conftest|__main__|setup)$")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_and_modules(name: str) -> tuple[md.Distribution | None, list[str]]:
    """The distribution and its top-level import names, from either kind of name."""
    by_module = md.packages_distributions()
    dist = None
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        pass
    if dist is not None:
        want = _canon(dist.metadata["Name"] or name)
        mods = sorted(m for m, ds in by_module.items() if want in {_canon(d) for d in ds})
        public = [m for m in mods if not m.startswith("_")]
        return dist, public or mods
    dists = by_module.get(name)
    if dists:
        try:
            dist = md.distribution(dists[0])
        except md.PackageNotFoundError:
            dist = None
    if importlib.util.find_spec(name) is not None:
        return dist, [name]
    return None, []


def _doc(obj: object) -> str:
    d = inspect.getdoc(obj) or ""
    return d if len(d) <= MAX_DOC_CHARS else d[:MAX_DOC_CHARS] + " [...]"


def _sig(obj: object) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _public(mod: object) -> list[str]:
    names = getattr(mod, "__all__", None)
    if isinstance(names, (list, tuple)):
        return [n for n in names if isinstance(n, str)]
    own = getattr(mod, "__name__", "")
    out = []
    for n, v in vars(mod).items():
        if n.startswith("_"):
            continue
        if (inspect.isclass(v) or inspect.isfunction(v) or inspect.isbuiltin(v)) and \
                getattr(v, "__module__", None) == own:
            out.append(n)
    return out


def _document(mod: object) -> str:
    name = mod.__name__
    lines = [f"### module {name}"]
    if d := _doc(mod):
        lines.append(d)
    for n in _public(mod):
        v = getattr(mod, n, None)
        if v is None:
            continue
        if inspect.isclass(v):
            lines.append(f"#### class {name}.{n}{_sig(v)}")
            if d := _doc(v):
                lines.append(d)
            members = []
            for mn, mv in vars(v).items():
                if mn.startswith("_") and mn != "__call__":
                    continue
                f = mv.__func__ if isinstance(mv, (classmethod, staticmethod)) else mv
                if isinstance(mv, property):
                    head = f"- property `{n}.{mn}`"
                elif callable(f) and not inspect.isclass(f):
                    head = f"- `{n}.{mn}{_sig(f)}`"
                else:
                    continue
                d = _doc(mv if isinstance(mv, property) else f)
                members.append(head + ("\n" + "\n".join("  " + ln for ln in d.splitlines()) if d else ""))
            if members:
                lines.append("\n".join(members))
        elif callable(v):
            lines.append(f"#### {name}.{n}{_sig(v)}")
            if d := _doc(v):
                lines.append(d)
    return "\n\n".join(lines)


def _module_names(top: str, deadline: float) -> tuple[list[str], list[tuple[str, str]]]:
    names, skipped = [top], []
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return names, skipped
    for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=top + ".",
                                      onerror=lambda n: skipped.append((n, "could not be listed"))):
        if any(_SKIP_PARTS.match(p) for p in info.name.split(".")[1:]):
            continue
        if len(names) >= MAX_MODULES or time.monotonic() > deadline:
            skipped.append((info.name, "over the module limit"))
            break
        names.append(info.name)
    return names, skipped


def main(name: str) -> dict:
    deadline = time.monotonic() + TIME_LIMIT_S
    dist, tops = _dist_and_modules(name)
    if dist is None and not tops:
        return {"error": f"no installed package {name!r} (neither a distribution nor a module "
                         f"importable by {sys.executable})"}
    out: dict = {"dist": dist.metadata["Name"] if dist else name,
                 "version": dist.version if dist else "",
                 "summary": (dist.metadata["Summary"] or "") if dist else "",
                 "readme": "", "llms": "", "llms_name": "", "api": "", "modules": [],
                 "skipped": [], "notes": []}
    if dist is not None:
        meta = dist.metadata
        body = meta.get_payload() if hasattr(meta, "get_payload") else ""
        out["readme"] = (body or meta["Description"] or "").strip()
        for f in dist.files or []:
            base = f.name.lower()
            if base in ("llms-full.txt", "llms.txt", "llms.md", "llms-full.md"):
                try:
                    text = f.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                # the full file over the index when a package ships both
                if not out["llms"] or "full" in base:
                    out["llms"], out["llms_name"] = text, f.name
    api: list[str] = []
    size = 0
    for top in tops:
        names, skipped = _module_names(top, deadline)
        out["skipped"] += skipped
        for mn in names:
            if time.monotonic() > deadline:
                out["skipped"].append((mn, "over the time limit"))
                continue
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    warnings.simplefilter("ignore")
                    mod = importlib.import_module(mn)
                text = _document(mod)
            except BaseException as e:  # noqa: BLE001 - a module's import may raise anything, SystemExit included
                out["skipped"].append((mn, f"import failed: {type(e).__name__}: {str(e)[:200]}"))
                continue
            if size + len(text) > MAX_API_CHARS:
                out["notes"].append(f"API text cut at {MAX_API_CHARS:,} characters")
                break
            size += len(text)
            api.append(text)
            out["modules"].append(mn)
    out["api"] = "\n\n".join(api)
    return out


if __name__ == "__main__":
    real_stdout = sys.stdout
    sys.path[:0] = sys.argv[2:]  # folders to document from before the installed packages
    try:
        result = main(sys.argv[1])
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        result = {"error": f"could not document {sys.argv[1]}: {type(e).__name__}: {e}"}
    real_stdout.write("\n" + json.dumps(result) + "\n")
    real_stdout.flush()
    os._exit(0)  # a package's atexit hooks or threads do not keep this process alive
