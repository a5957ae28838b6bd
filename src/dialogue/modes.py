"""Modes: per-dialogue presets for how the model answers, each a plain system prompt text.

A mode is not hidden behaviour: it is text, stored with the dialogue (``meta["mode"]`` =
``{"name": ..., "prompt": ...}``), shown and editable in the settings, and appended to the system
prompt of every request (`context.build`), so the request shows exactly what was sent. Choosing a
mode copies its preset text into the dialogue; editing the text afterwards keeps the mode's name
and the edited text (`is_edited` says so). "standard" adds nothing: a dialogue without a mode and
one in standard mode send the same request.

The text sits in the system prompt, the start of the stable prefix, so a mode costs one cache miss
when it changes and nothing after.
"""
from __future__ import annotations

from typing import Any

__all__ = ["MODES", "DEFAULT_MODE", "ModeError", "mode_of", "with_mode", "is_edited"]

DEFAULT_MODE = "standard"

MODES: dict[str, str] = {
    "standard": "",
    "learning": (
        "The user is learning. Work in small steps: explain one idea at a time, check their "
        "understanding, and let them write the code. Before writing code for them, ask whether "
        "they want to try it themselves first; when you do write code, keep it to the few lines "
        "the current step needs and say what each part does."),
    "concise": (
        "Answer concisely: the answer first, in as few words as it takes, with no preamble, no "
        "restating of the question and no summary at the end. Show code without commentary "
        "unless asked."),
}
"""The presets, by name: the text each appends to the system prompt ("" for none)."""


class ModeError(ValueError):
    """An unknown mode name or a mode setting that is not one."""


def mode_of(meta: dict[str, Any]) -> tuple[str, str]:
    """(name, prompt text) of a dialogue's mode, from its meta; ("standard", "") when unset. A
    stored setting that is not a mode (hand-edited meta) is refused, so the request never
    silently differs from what the settings show."""
    m = meta.get("mode")
    if m is None:
        return DEFAULT_MODE, ""
    if not (isinstance(m, dict) and isinstance(m.get("name"), str)
            and isinstance(m.get("prompt", ""), str)):
        raise ModeError(f"the dialogue's mode setting {m!r} is not a mode: choose one of "
                        f"{', '.join(MODES)}")
    return m["name"], m.get("prompt", "")


def with_mode(meta: dict[str, Any], name: str, prompt: str | None = None) -> dict[str, Any]:
    """A copy of `meta` in mode `name`, with its preset text, or `prompt` (the user's edit of
    it). Standard with no text of its own leaves no setting behind."""
    name = (name or "").strip().lower()
    if name not in MODES:
        raise ModeError(f"unknown mode {name!r}: choose one of {', '.join(MODES)}")
    text = MODES[name] if prompt is None else prompt.replace("\r\n", "\n").strip()
    out = {k: v for k, v in meta.items() if k != "mode"}
    if name != DEFAULT_MODE or text:
        out["mode"] = {"name": name, "prompt": text}
    return out


def is_edited(name: str, prompt: str) -> bool:
    """Whether a mode's text differs from its preset."""
    return MODES.get(name) != prompt
