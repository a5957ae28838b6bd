"""Exported code messages -> one importable Python module.

A dialogue's durable outcome is often a module: the user works in small code messages, then
flags the keepers `exported` (or writes nbdev's `#| export` directive at the top of the cell,
which the notebook importer turns into the flag). This module writes them, in order, after a
header that names the source dialogue, the way nbdev's `nbdev_export` does for notebooks:

- leading directive lines (`#| export`, `#| exports`, `#| exporti`, `#| hide`, any `#|` line,
  and nbdev 1's `#export`) are stripped: they mean nothing outside a notebook;
- `from __future__` imports are hoisted to the top, where Python requires them;
- `__all__` lists the public top-level names of `export`/`exports` messages (not `exporti`,
  nbdev's "internal" export), as nbdev does;
- a `# %% message <id>` line before each block says where the code came from.

A message that is not valid Python (IPython magics, `!shell` lines) cannot go into a module that
must import, so it is refused with the message's id and the syntax error, instead of writing a
module that fails at import. nbdev's `#| export some.module` target is ignored: a dialogue
exports one module.
"""
from __future__ import annotations

import ast
import re

from dialogue.document import Dialogue, Kind, Message

__all__ = ["to_module", "export_directive", "strip_directives", "directives", "ModuleExportError"]


class ModuleExportError(ValueError):
    """The dialogue cannot become an importable module (nothing exported, or invalid code)."""


# nbdev 2: `#| export`, `#|export`, `# | export`; nbdev 1: `#export`, `# export` on the first
# line. Only the leading block of comments counts, as in nbdev (directives precede code).
_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)")
_NBDEV1 = re.compile(r"^\s*#\s?(export|exports|exporti)\s*$")
_EXPORT_KINDS = ("export", "exports", "exporti")


def _leading(source: str) -> list[str]:
    """The leading lines of a cell that may hold directives: blank lines and comments."""
    out = []
    for line in source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        out.append(line)
    return out


def export_directive(source: str) -> str | None:
    """`export`, `exports` or `exporti` when the cell carries that nbdev directive, else None."""
    for line in _leading(source):
        m = _DIRECTIVE.match(line) or _NBDEV1.match(line)
        if m and m.group(1) in _EXPORT_KINDS:
            return m.group(1)
    return None


def directives(source: str) -> dict[str, str]:
    """The cell's leading nbdev/Quarto directives, `#| key: value` -> {key: value} (a bare
    `#| hide` gives {"hide": ""}). The post exporters honour `hide`, `echo: false` and
    `output: false` the way nbdev's docs do."""
    out: dict[str, str] = {}
    for line in _leading(source):
        m = re.match(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$", line)
        old = _NBDEV1.match(line)
        if m:
            out[m.group(1).lower()] = m.group(2)
        elif old:
            out[old.group(1)] = ""
    return out


def strip_directives(source: str) -> str:
    """The source without its leading `#|` directive lines (and nbdev 1 export comments)."""
    lines = source.splitlines(keepends=True)
    n = len(_leading(source))
    kept = [ln for ln in lines[:n] if not (_DIRECTIVE.match(ln) or _NBDEV1.match(ln))]
    return "".join(kept + lines[n:]).strip("\n")


def _public_names(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.append(n.id)
    return [n for n in names if not n.startswith("_")]


def _split_future(code: str, tree: ast.Module) -> tuple[list[str], str]:
    """Pull `from __future__ import ...` statements out of a block (they must open the module)."""
    lines = code.splitlines(keepends=True)
    future: list[str] = []
    drop: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            span = range(node.lineno - 1, (node.end_lineno or node.lineno))
            future.append("".join(lines[i] for i in span).strip())
            drop.update(span)
    rest = "".join(ln for i, ln in enumerate(lines) if i not in drop).strip("\n")
    return future, rest


def _position(dialogue: Dialogue, m: Message) -> int:
    return next(i for i, x in enumerate(dialogue.messages) if x is m) + 1


def _exported(dialogue: Dialogue) -> list[Message]:
    return [m for m in dialogue.messages if m.kind == Kind.code and m.exported]


def to_module(dialogue: Dialogue) -> str:
    """The source of a module made of the dialogue's exported code messages, in order.

    Raises ModuleExportError when nothing is exported or an exported message is not valid
    Python."""
    msgs = _exported(dialogue)
    if not msgs:
        raise ModuleExportError(
            f"dialogue {dialogue.name!r} has no exported code messages: flag the code you want "
            "in the module as exported (or start the cell with `#| export`)")
    future: list[str] = []
    blocks: list[str] = []
    public: list[str] = []
    for m in msgs:
        code = strip_directives(m.source)
        try:
            tree = ast.parse(code, filename=f"<message {m.id}>")
        except SyntaxError as e:
            raise ModuleExportError(
                f"exported message {m.id} (message {_position(dialogue, m)} of "
                f"{dialogue.name!r}) is not valid Python, so the module would not import: "
                f"line {e.lineno}: {e.msg}. IPython magics and !shell lines cannot be exported; "
                "unflag the message or rewrite it as plain Python") from None
        fut, rest = _split_future(code, tree)
        future.extend(f for f in fut if f not in future)
        if export_directive(m.source) != "exporti":
            public.extend(n for n in _public_names(tree) if n not in public)
        if rest.strip():
            blocks.append(f"# %% message {m.id}\n{rest}\n")
    header = (f'"""Module exported from the dialogue {dialogue.name!r} (id {dialogue.id}).\n\n'
              "Generated by `dialogue` from the messages flagged exported, in dialogue order.\n"
              'Edit the dialogue and export again rather than editing this file.\n"""\n')
    parts = [header]
    if future:
        parts.append("\n".join(future) + "\n")
    if public:
        parts.append(f"__all__ = {public!r}\n")
    parts.append("\n" + "\n\n".join(blocks))
    out = "\n".join(p.rstrip("\n") for p in parts if p) + "\n"
    ast.parse(out)  # the blocks parsed one by one; the whole must too (it always should)
    return out
