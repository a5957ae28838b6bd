"""What a file from elsewhere may set, and what it may not.

A notebook someone else wrote is data: its cells, notes, outputs and name come in as they are, but
nothing in it may choose where the user's prompts and keys go, what the model is told before the
dialogue, or the ids that address things in the store. Every way in (`dialogue import`, the web
upload, `DialogueService.import_dialogue` from Python, `dialogue run FILE.ipynb`) goes through
`vet_import`:

- **Model.** Kept only when it names a model the user configured (`model_refusal` says why not):
  a hosted provider's name with no URL in it (claude-*, gpt-*, o1/o3/o4*, chatgpt-*: their
  endpoints and keys come from the user's environment), a bundled or registered local model
  (``local:default``, ``local:<registered name>``; not a path to a file), or
  ``openai-compatible:<url>/...`` whose base URL is in ``OPENAI_COMPATIBLE_BASE_URL``
  (`llm.openai.configured_base`). Otherwise the dialogue gets the user's default model.
- **System prompt.** Never adopted silently: it is set aside in ``meta["import"]["system"]`` and
  the dialogue's system prompt is left empty, unless the caller passes ``trust=True`` (``dialogue
  import --trust``; the web's "Use it" button).
- **Mode.** A mode's text (``meta["mode"]``, see `modes`) is appended to the system prompt, so it
  is treated as one: set aside in ``meta["import"]["mode"]`` unless ``trust=True``.
- **Adapters.** Registered adapter names are the user's own; an adapter given as a file path is
  dropped (set aside like the system prompt).
- **Kernel.** Our own kernel setting in a file (an interpreter's path) is set aside; the file's
  Jupyter `kernelspec` selects a kernel only when one of that name is installed here.
- **MCP servers.** A file never configures or enables one (``meta["mcp"]``): a server is a
  program to run or a URL to call. Set aside, by name only (an entry's env and headers may hold
  keys).
- **Document tools.** A file never turns on the model's tools over the dialogue
  (``meta["doc_tools"]``): set aside, off until the user turns them on.
- **Approvals.** A file never allows a tool to run without asking (``meta["approvals"]["always"]``,
  see `approvals`): the list is set aside; asking for reading tools too is kept (it only asks more).
- **Ids.** The dialogue's id is always ours (the store makes one). A message id is kept only when
  it has the shape of the ids we make (`is_local_id`: 8 lower-case hex digits, at least one a
  letter, so it is never read as a position); anything else gets a fresh id. The store still
  replaces an id that is taken.

What was set aside and why is recorded in ``meta["import"]`` (``{"warnings": [...], "model": ...,
"system": ..., "adapters": ..., "kernel": ...}``) so that every surface can tell the user, and the user can still
adopt it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .document import Dialogue, Message, new_id

__all__ = ["is_local_id", "model_refusal", "vet_import", "Vetted", "IMPORT_KEY", "import_record",
           "model_text"]

IMPORT_KEY = "import"
"""The dialogue meta key that records what an import set aside."""

_LOCAL_ID = re.compile(r"^[0-9a-f]{8}$")
_MODEL_NAME = re.compile(r"^[\x21-\x7e]{1,300}$")  # printable ASCII, no spaces or controls


def is_local_id(s: Any) -> bool:
    """Whether `s` has the shape of an id `document.new_id` makes: 8 lower-case hex digits with at
    least one letter. All-digit strings are positions in a message reference ("1" is the first
    message), so an id must never look like one."""
    return isinstance(s, str) and bool(_LOCAL_ID.match(s)) and not s.isdigit()


def model_refusal(model: str) -> str | None:
    """None when `model` names a model the user configured, else why it is not one (a phrase that
    completes "was not used: ...")."""
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        return "it is not a model name"
    from .llm.base import UnknownModelError, resolve
    if model.startswith("openai-compatible:"):
        try:
            from .llm.openai import BASE_URL_ENV, configured_base, parse_compatible
        except ImportError:
            return "the openai package is not installed"
        try:
            base, _ = parse_compatible(model)
        except UnknownModelError:
            return "it is not a valid openai-compatible model name"
        if not configured_base(base):
            return (f"its server {base} is not one you configured (list it in {BASE_URL_ENV} "
                    "to use it)")
        return None
    if model.startswith(("llama-server:", "vllm:")):
        from .llm.engines import parse_engine
        from .llm.openai import BASE_URL_ENV, configured_base
        try:
            _, root, _ = parse_engine(model)
        except UnknownModelError:
            return "it is not a valid serving-engine model name"
        if not configured_base(root + "/v1"):
            return (f"its server {root} is not one you configured (list {root}/v1 in "
                    f"{BASE_URL_ENV} to use it)")
        return None
    if model.startswith("local:"):
        return _local_refusal(model.removeprefix("local:").strip())
    if "://" in model:  # a provider we do not know that carries its own endpoint
        return "it names its own server"
    try:
        resolve(model)
    except UnknownModelError:
        return "no provider here serves it"
    return None


def _local_refusal(name: str) -> str | None:
    from .gguf import models
    if name in ("", *models.BUNDLED_NAMES, models.GEMMA_NAME):
        return None
    if name.endswith(".gguf") or "/" in name or "\\" in name or name.startswith("~"):
        return ("it is a path to a model file; register the file with `dialogue models add` "
                "and use its name")
    try:
        # The registry of names the user added; reading it opens no model file.
        registered = models._read_registry()
    except Exception as e:  # noqa: BLE001 - an unreadable registry: nothing is registered
        return f"the local model registry cannot be read ({e})"
    return None if name in registered else "it is not a local model registered here"


@dataclass
class Vetted:
    """A dialogue read from a file, made safe to store, and what the user should be told."""

    dialogue: Dialogue
    warnings: list[str] = field(default_factory=list)


def vet_import(doc: Dialogue, *, default_model: str, trust: bool = False) -> Vetted:
    """A copy of `doc` that a store may create as is (see the module docstring). `trust` adopts
    the notebook's system prompt; nothing adopts an endpoint the user did not configure. The
    returned dialogue's meta carries ``meta["import"]`` when anything was set aside."""
    warnings: list[str] = []
    record: dict[str, Any] = {}
    meta = {k: v for k, v in doc.meta.items() if k != IMPORT_KEY}  # never a file's own record

    model = doc.model or ""
    if model:
        why = model_refusal(model)
        if why is not None:
            record["model"] = model
            model = ""
            warnings.append(f"the notebook's model {model_text(record['model'])} was not used: "
                            f"{why}; the dialogue uses {default_model}")
    system = doc.system or ""
    if system and not trust:
        record["system"] = system
        system = ""
        warnings.append(f"the notebook's system prompt ({len(record['system']):,} characters) "
                        "was not adopted")
    mode = meta.get("mode")
    if mode is not None and not (trust and isinstance(mode, dict)) and not (
            isinstance(mode, dict) and mode.get("prompt") == ""):  # a mode is system prompt text
        record["mode"] = meta.pop("mode")
        text = mode.get("prompt", "") if isinstance(mode, dict) else mode
        warnings.append(f"the notebook's mode text ({len(str(text)):,} characters) was not "
                        "adopted")
    adapters = meta.get("adapters")
    if isinstance(adapters, dict) and adapters:
        from .local.adapters import looks_like_path
        paths = {k: v for k, v in adapters.items() if not isinstance(k, str) or looks_like_path(k)}
        if paths:
            record["adapters"] = paths
            kept = {k: v for k, v in adapters.items() if k not in paths}
            if kept:
                meta["adapters"] = kept
            else:
                meta.pop("adapters")
            warnings.append(f"{len(paths)} adapter(s) given as file paths were not used; "
                            "register an adapter file with `dialogue adapters add` to use it")
    elif "adapters" in meta and not isinstance(adapters, dict):
        record["adapters"] = meta.pop("adapters")
        warnings.append("the notebook's adapter set is not a mapping {name: scale} and was "
                        "not used")
    _vet_kernel(meta, record, warnings)
    _vet_mcp(meta, record, warnings)
    _vet_doc_tools(meta, record, warnings)
    _vet_approvals(meta, record, warnings)
    if record:
        record["warnings"] = warnings
        meta[IMPORT_KEY] = record

    messages = []
    seen: set[str] = set()
    for m in doc.messages:
        mid = m.id if is_local_id(m.id) and m.id not in seen else new_id()
        while mid in seen:
            mid = new_id()
        seen.add(mid)
        messages.append(m.copy(id=mid))
    # A fresh id: the store's, never the file's (create_dialogue makes another if it is taken).
    safe = Dialogue(name=doc.name, id=new_id(), model=model or default_model, system=system,
                    context=list(doc.context), messages=messages, meta=meta)
    return Vetted(safe, warnings)


def _vet_kernel(meta: dict[str, Any], record: dict[str, Any], warnings: list[str]) -> None:
    """A file never picks what runs its code: our own kernel setting in it (an interpreter's path,
    a kernelspec name, or a gateway's kernel: the gateway's URL is only ever the config's) is set
    aside; its Jupyter `kernelspec` may name an installed kernel,
    which the dialogue then uses (Jupyter's plain `python3` means the default kernel). The
    file's kernelspec and language_info stay in meta as they were, and export rewrites them."""
    from .kernel.specs import KEY, PYTHON_SPEC, installed
    if KEY in meta:
        record["kernel"] = meta.pop(KEY)
        warnings.append("the notebook's kernel setting was not used: a file does not choose "
                        "what runs its code (choose a kernel with `dialogue kernel`)")
    ks = meta.get("kernelspec")
    name = ks.get("name") if isinstance(ks, dict) else None
    if not isinstance(name, str) or not name or name == PYTHON_SPEC["name"]:
        return
    if name in installed():
        meta[KEY] = {"spec": name}
    else:
        record["kernelspec"] = name
        warnings.append(f"the notebook's kernel {model_text(name)} is not installed here; the "
                        "dialogue uses the default Python kernel")


def _vet_mcp(meta: dict[str, Any], record: dict[str, Any], warnings: list[str]) -> None:
    """A file never starts a program or picks a URL: its MCP servers and the servers it enables
    (``meta["mcp"]``, see `mcptools`) are set aside, named in the warning (names only: an entry's
    env and headers may hold someone's keys, and are not repeated)."""
    from .mcptools import META_KEY
    if META_KEY not in meta:
        return
    got = meta.pop(META_KEY)
    servers = got.get("servers") if isinstance(got, dict) else None
    enabled = got.get("enabled") if isinstance(got, dict) else None
    record["mcp"] = {"servers": [str(n) for n in servers] if isinstance(servers, dict) else [],
                     "enabled": [str(n) for n in enabled] if isinstance(enabled, list) else []}
    names = sorted({*record["mcp"]["servers"], *record["mcp"]["enabled"]})
    warnings.append("the notebook's MCP servers were not used: a file does not start programs "
                    "or choose servers" + (f" ({', '.join(model_text(n, 40) for n in names)})"
                                           if names else "")
                    + "; configure and enable servers with `dialogue mcp`")


def _vet_doc_tools(meta: dict[str, Any], record: dict[str, Any], warnings: list[str]) -> None:
    """A file never lets the model edit and run the dialogue: its document tools setting
    (``meta["doc_tools"]``, see `doc_tools`) is set aside; they stay off until the user turns
    them on."""
    if "doc_tools" not in meta:
        return
    got = meta.pop("doc_tools")
    record["doc_tools"] = got if got == "all" or (
        isinstance(got, list) and all(isinstance(x, str) for x in got)) else repr(got)[:200]
    warnings.append("the notebook turned on the model's document tools; they are off here: a "
                    "file does not let the model edit or run the dialogue (turn them on with "
                    "`dialogue tools` or the settings)")


def _vet_approvals(meta: dict[str, Any], record: dict[str, Any], warnings: list[str]) -> None:
    """A file never lets the model's tool calls run without asking: its "always allow" list
    (``meta["approvals"]``, see `approvals`) is set aside; asking for reading tools too stays."""
    from .approvals import settings_of
    if "approvals" not in meta:
        return
    got = meta.pop("approvals")
    s = settings_of({"approvals": got})
    if s["ask_reads"]:
        meta["approvals"] = {"always": [], "ask_reads": True}
    if s["always"] or (isinstance(got, dict) and got.get("always")):
        record["approvals"] = {"always": [model_text(n, 60) for n in s["always"]]}
        warnings.append("the notebook allowed tools to run without asking; here they ask first "
                        "(a file does not approve tool calls)")


def model_text(model: str, limit: int = 120) -> str:
    """A model name from a file, quoted for a message: control characters escaped (repr), cut."""
    s = model if len(model) <= limit else model[:limit] + "…"
    return repr(s)


def import_record(d: Dialogue) -> dict[str, Any]:
    """What the import of `d` set aside ({} when nothing was)."""
    rec = d.meta.get(IMPORT_KEY)
    return rec if isinstance(rec, dict) else {}
