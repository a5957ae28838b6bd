"""The dialogue service: the one API that the web app, the CLI and Python code call.

Surfaces name dialogues by name or id and messages by id, a unique id prefix, or a 1-based
position; the service resolves those, applies defaults, and delegates persistence to the store.
Running code and prompts (kernel, providers) is added here as well, so that no surface talks to a
kernel or an SDK directly.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable

from .document import FLAGS, ContextItem, Dialogue, Kind, Message
from .runs import Answer, LiveState, RunAll, RunError, RunEvent, Runs, follow, run_status
from .llm.base import ModelInfo, Progress, ProviderError, TextDelta, Usage
from .progress import OnProgress, Step
from .store import (HIT_END, HIT_START, ConflictError, Folder, NameTakenError, NotFoundError,
                    SearchHit, Store, StoreError, TrashItem, Version, default_db_path)
from .modes import MODES, ModeError, is_edited, mode_of, with_mode
from .trust import import_record
from . import images as _images
from .images import ImageError
from .approvals import ApprovalError, decision_of, describe_call, settings_of as approval_settings
from .sent import (context_words, entry_words, mode_name, system_marked, turn_text, turn_title,
                   turn_tokens)

if TYPE_CHECKING:
    from .kernel import Kernel, KernelPool
    from .mcptools import MCPPool, ServerConfig

__all__ = ["DialogueService", "RunEvent", "RunError", "LiveState", "RunAll", "Answer", "follow",
           "AdapterView", "import_record",
           "DEFAULT_MODEL", "default_model",
           # what surfaces catch, read and name, so that they import the service alone
           # (tests/test_layout.py): errors, search-hit markers, model listings and events
           "ConflictError", "NameTakenError", "NotFoundError", "StoreError", "ProviderError",
           "HIT_START", "HIT_END", "SearchHit", "TrashItem", "Version", "ModelInfo", "Progress",
           "TextDelta", "Usage", "default_db_path", "Step", "OnProgress", "ImageError",
           "Folder", "MODES", "ModeError", "mode_of", "is_edited", "ApprovalError", "describe_call",
           "decision_of",
           "approval_settings", "entry_words", "context_words", "system_marked", "mode_name",
           "turn_text", "turn_title", "turn_tokens"]

DEFAULT_MODEL = "local:default"
# serving engines that apply adapter sets themselves (llm/engines.py)
_ENGINES = ("llama-server:", "vllm:")


def default_model() -> str:
    """`DIALOGUE_MODEL` if set, else the bundled local model: works offline, with no key."""
    return os.environ.get("DIALOGUE_MODEL") or DEFAULT_MODEL


DEFAULT_STOP_GRACE = 5.0


def _stop_grace() -> float:
    """`DIALOGUE_STOP_GRACE` (seconds) if set, else 5: how long Stop waits for an interrupted
    cell before it restarts the kernel."""
    v = os.environ.get("DIALOGUE_STOP_GRACE", "").strip()
    if not v:
        return DEFAULT_STOP_GRACE
    try:
        g = float(v)
        if 0 < g < float("inf"):
            return g
    except ValueError:
        pass
    # a StoreError, so every surface reports it in one line
    raise RunError(f"DIALOGUE_STOP_GRACE must be a positive number of seconds, got {v!r}")


@dataclass
class AdapterView:
    """A dialogue's adapters as a picker shows them (`DialogueService.adapter_view`): `choices`,
    the registered adapters (AdapterInfo) that fit its local model, and `problems`, why an entry
    of its set is not one of them."""

    choices: list[Any] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


class DialogueService:
    # Streamed text and outputs are written to the store at most this often (seconds): each write
    # is a transaction, and a model emits tokens faster than a page needs them on disk.
    flush_every = 0.1

    def __init__(self, store: Store | str | os.PathLike | None = None, *,
                 kernel_idle_timeout: float | None = 3600.0, run_timeout: float | None = None,
                 stop_grace: float | None = None):
        stop_grace = _stop_grace() if stop_grace is None else stop_grace
        if not 0 < stop_grace < float("inf"):
            raise ValueError(f"stop_grace must be a positive number of seconds, got {stop_grace}")
        self.store = store if isinstance(store, Store) else Store(store)
        self.kernel_idle_timeout = kernel_idle_timeout
        self.run_timeout = run_timeout
        # Seconds a cell gets to stop after Stop interrupts it before its kernel is restarted.
        self.stop_grace = stop_grace
        self._kernels: "KernelPool | None" = None
        self._restarting: set[str] = set()  # dialogues whose kernel restarts now
        self._restart_tasks: set[Any] = set()
        self._ran: dict[str, tuple[Any, dict]] = {}  # dialogue -> (kernel choice, language_info)
        self._runs = Runs(self)
        self._mcp: "MCPPool | None" = None  # the MCP servers started, on first use

    def close(self) -> None:
        self.store.close()

    async def shutdown_kernels(self) -> None:
        """Stop every run and kernel; the store stays open."""
        await self._runs.cancel_all()
        if self._kernels is not None:
            await self._kernels.shutdown_all()
        if self._mcp is not None:
            await self._mcp.close()

    async def aclose(self) -> None:
        """Stop every run and kernel, then close the store."""
        await self.shutdown_kernels()
        self.close()

    # ------------------------------------------------------------ resolving references

    def dialogue_id(self, ref: str | Dialogue) -> str:
        return ref.id if isinstance(ref, Dialogue) else self.store.find_dialogue(ref)

    def message_id(self, dialogue: str | Dialogue, ref: str | Message) -> str:
        """A message id from an id, a unique prefix of one (4+ characters), or a 1-based position
        in the dialogue ("1" is the first message, "-1" the last)."""
        if isinstance(ref, Message):
            return ref.id
        msgs = self.store.messages(self.dialogue_id(dialogue))
        ref = str(ref).strip()
        # A short all-digit ref is a position, even where a message's id is the same string (an
        # older import kept a cell id "1"): ids we make always hold a letter and imports replace
        # any other id (trust.is_local_id). Older stores may still hold all-digit 8-character ids,
        # so a 4+ character ref that is a prefix of an id is that id ("89253" of "89253012").
        prefix_hit = len(ref) >= 4 and any(m.id.startswith(ref) for m in msgs)
        position = ref.lstrip("-").isdigit() and len(ref) < 8 and not prefix_hit
        if not position and any(m.id == ref for m in msgs):
            return ref
        if position:
            i = int(ref)
            if i == 0 or abs(i) > len(msgs):
                raise NotFoundError(f"no message at position {ref} (the dialogue has {len(msgs)})")
            return msgs[i - 1 if i > 0 else i].id
        hits = [m.id for m in msgs if len(ref) >= 4 and m.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise NotFoundError(f"message id prefix {ref!r} is ambiguous: {', '.join(hits)}")
        raise NotFoundError(f"no message {ref!r} in this dialogue")

    # ------------------------------------------------------------ dialogues

    def create(self, name: str, *, model: str | None = None, system: str = "",
               context: list[ContextItem] | None = None, meta: dict | None = None,
               output_limit: str | None = None, folder: str | None = None,
               template: bool = True) -> Dialogue:
        """A new dialogue. A model named here is checked first (`check_model`); without one the
        dialogue gets the configured default, which is not (it may be a provider registered
        later in the process). A bad `output_limit` is refused before anything is stored.

        In a `folder` (a path or id) with a template, the dialogue starts from the template (its
        messages, model, system prompt, attached context and settings), unless `template` is
        False; a model or system prompt named here still wins over the template's."""
        if model:  # "" or None: the default
            self.check_model(model)
        fid = self.folder_id(folder) if folder else ""
        tpl = self.store.get_folder(fid).template if fid and template else ""
        if tpl:
            try:
                self.store.get_dialogue(tpl, with_messages=False)
            except NotFoundError:
                raise NotFoundError(
                    f"the template of folder {self.store.get_folder(fid).path!r} (dialogue {tpl}) "
                    "is in the trash or gone: set another (`dialogue folder template`) or create "
                    "the dialogue without it") from None
            d = self.store.from_template(tpl, name, folder=fid)
            changes = {k: v for k, v in (("model", model), ("system", system)) if v}
            if output_limit is not None:
                changes["output_limit"] = output_limit
            return self.update(d.id, **changes) if changes else d
        if output_limit is not None:
            from .context import with_output_limit
            meta = with_output_limit(meta or {}, output_limit)
        return self.store.create_dialogue(name, model=model or default_model(), system=system,
                                          context=context, meta=meta, folder=fid)

    def open(self, ref: str, *, messages: bool = True) -> Dialogue:
        """The dialogue as stored; without its messages when `messages` is False (its settings)."""
        # A page or `show` of a dialogue says so when the process writing one of its messages
        # died since the store was opened (a killed `dialogue ask`); an indexed lookup when not.
        self.store.recover_interrupted()
        return self.store.get_dialogue(self.dialogue_id(ref), with_messages=messages)

    def messages(self, ref: str) -> list[Message]:
        return self.store.messages(self.dialogue_id(ref))

    @property
    def path(self) -> Path:
        """The database file."""
        return self.store.path

    def claim_server(self, address: str) -> None:
        """Become the one server of this database; a second is refused, naming the first."""
        self.store.claim_server(address)

    def recover_interrupted(self) -> None:
        """Turn the streams of writers that died (a killed server or CLI) into versions."""
        self.store.recover_interrupted()

    def list(self, *, deleted: bool = False) -> list[dict[str, Any]]:
        return self.store.list_dialogues(deleted=deleted)

    def rename(self, ref: str, new_name: str, *, base_version: int | None = None) -> Dialogue:
        return self.update(ref, base_version=base_version, name=new_name)

    def update(self, ref: str | Dialogue, *, base_version: int | None = None, op: str = "edit",
               **settings: Any) -> Dialogue:
        """Change name, model, system, attached context, meta, `mode` / `mode_prompt` (see
        `set_mode`), or `output_limit` (how much of
        long code outputs the model sees, kept in meta: see context.parse_output_limit; a bad
        value is refused now, not at the next prompt). Without `base_version` the current
        version is used: fine for a one-shot CLI command, while a long-lived surface (a browser
        tab) passes the version it showed the user. A new model is checked (`check_model`).
        `ref` may be the dialogue as just read (a setter computing its new settings from it):
        it is not read again, and its version is the default base. `op` names the change in the
        dialogue's history ("edit" by default)."""
        did = self.dialogue_id(ref)
        cur = ref if isinstance(ref, Dialogue) else None

        def current() -> Dialogue:  # the dialogue's settings, read at most once
            nonlocal cur
            if cur is None:
                cur = self.store.get_dialogue(did, with_messages=False)
            return cur
        if "model" in settings:
            self.check_model(settings["model"])
        gen = {k: settings.pop(k) for k in ("max_tokens", "sampling") if k in settings}
        if gen or {"max_tokens", "sampling"} & set(settings.get("meta") or {}):
            meta = settings.get("meta")
            if meta is None:
                meta = current().meta
            settings["meta"] = with_generation(meta, **gen)
        if "output_limit" in settings or "output_limit" in (settings.get("meta") or {}):
            from .context import with_output_limit
            meta = settings.get("meta")
            if meta is None:
                meta = current().meta
            settings["meta"] = with_output_limit(
                meta, settings.pop("output_limit", meta.get("output_limit", "default")))
        if "mode" in settings or "mode_prompt" in settings:  # see set_mode
            meta = settings.get("meta")
            if meta is None:
                meta = current().meta
            name = settings.pop("mode", None) or mode_of(meta)[0]
            settings["meta"] = with_mode(meta, name, settings.pop("mode_prompt", None))
        if base_version is None:
            base_version = current().version
        return self.store.update_dialogue(did, base_version=base_version, op=op, **settings)

    def attach(self, ref: str, name: str, content: str, *, kind: str = "text",
               source: str = "", base_version: int | None = None) -> Dialogue:
        """Attach a context item (text every prompt of the dialogue sees), replacing one of the
        same name in its place. A versioned settings change: a stale `base_version` raises
        ConflictError."""
        name = name.strip()
        if not name:
            raise StoreError("an attached context item needs a name")
        d = self.open(ref, messages=False)
        new = ContextItem(name, content, kind, source)
        # a replaced item keeps its place: the model reads attached items in order
        items = [new if c.name == name else c for c in d.context] \
            if any(c.name == name for c in d.context) else [*d.context, new]
        return self.update(d, base_version=base_version, context=items)

    def attach_file(self, ref: str, path: str | os.PathLike, *, name: str | None = None,
                    base_version: int | None = None) -> Dialogue:
        """Attach a text file (or a folder's text files) under its name (or `name`), remembering
        where it came from: `attach_source` with a path."""
        return self.attach_source(ref, path=path, name=name, base_version=base_version)[0]

    def attach_source(self, ref: str, *, path: str | os.PathLike | None = None,
                      package: str | None = None, url: str | None = None, name: str | None = None,
                      base_version: int | None = None) -> tuple[Dialogue, Any]:
        """Attach exactly one of: a text file or a folder's text files (`path`), an installed
        package's documentation (`package`), a web page's text (`url`), under `name` (default: the
        file's, folder's or package's name, the URL's host and last path part). Returns the
        dialogue and what was read (`sources.Loaded`: the files, what was skipped and why). The
        source is read first (a package in a subprocess, a URL over the network: call this off an
        event loop); one that cannot be read raises StoreError and nothing is stored."""
        from . import sources
        if sum(x is not None and str(x) != "" for x in (path, package, url)) != 1:
            raise StoreError("attach one thing: a path, a package or a URL")
        try:
            if path is not None and str(path) != "":
                loaded = sources.read_path(path, name=name)
            elif package:
                loaded = sources.read_package(package, name=name)
            else:
                loaded = sources.read_url(str(url), name=name)
        except sources.SourceError as e:
            raise StoreError(str(e)) from e
        d = self.attach(ref, loaded.name, loaded.content, kind=loaded.kind, source=loaded.source,
                        base_version=base_version)
        return d, loaded

    def refresh(self, ref: str, item: str | None = None, *,
                base_version: int | None = None) -> tuple[Dialogue, list[dict[str, Any]]]:
        """Read attached items again from their sources: the one named `item`, or every item
        that has a source (pasted text has none and is listed as skipped). One record per item:
        name, and `changed` with `before`/`after` characters, or `error` (that item is kept as it
        was; the others are still refreshed), or `skipped`. A named item that cannot be read
        raises StoreError. Changed items are stored in one settings version."""
        from . import sources
        d = self.open(ref, messages=False)
        if item is not None and not any(c.name == item for c in d.context):
            there = ", ".join(repr(c.name) for c in d.context) or "none"
            raise NotFoundError(f"no attached item {item!r} in dialogue {d.name!r} (attached: {there})")
        items, report = list(d.context), []
        for i, c in enumerate(d.context):
            if item is not None and c.name != item:
                continue
            try:
                loaded = sources.read_source(c.kind, c.source, c.name)
            except sources.SourceError as e:
                if item is not None:
                    raise StoreError(f"cannot refresh {c.name!r}: {e}") from e
                report.append({"name": c.name, ("skipped" if isinstance(e, sources.NoSourceError)
                                                else "error"): str(e)})
                continue
            items[i] = ContextItem(c.name, loaded.content, loaded.kind, loaded.source)
            report.append({"name": c.name, "changed": loaded.content != c.content,
                           "before": len(c.content), "after": len(loaded.content)})
        if any(r.get("changed") for r in report):
            d = self.update(d, base_version=base_version, context=items)
        return d, report

    def context_status(self, ref: str) -> list[dict[str, Any]]:
        """Each attached item as its dialogue's model sees it: name, kind, source, chars, tokens
        (by the model's tokenizer where it has one: `exact`; else estimated) and `cached`: for a
        local model, whether the persistent KV cache holds the prompt prefix through the attached
        context (system prompt, attached context: a prompt reads them from disk, not again);
        None where that cannot be said (a hosted model, a dialogue with adapters or tools, whose
        prefix differs); and `retrieved`: too large for the model's context with the rest, so
        each prompt gets its best chunks (context.build), not the whole. Counting with a local
        model's tokenizer starts its process."""
        from .context import ContextError
        from .llm.base import get_provider
        d = self.open(ref, messages=False)
        if not d.context:
            return []
        provider = get_provider(d.model or default_model())
        counter = getattr(provider, "count_tokens", None)
        rows = []
        for c in d.context:
            n = _count_tokens(d.model, counter, c.content)
            rows.append({"name": c.name, "kind": c.kind, "source": c.source, "chars": len(c.content),
                         "tokens": n if n is not None else _estimate(c.content),
                         "exact": n is not None, "cached": None, "retrieved": False})
        window = getattr(provider, "context_window", None)
        max_tokens = int(d.meta.get("max_tokens", getattr(provider, "default_max_tokens", 1024)))
        try:
            req = self._prefix_request(d, budget=(window - max_tokens) if window else None,
                                       count_tokens=lambda t: _count_tokens(d.model, counter, t))
        except ContextError:
            return rows
        sent = [e for e in req.meta.get("context", []) if e.get("kind") != "folder"]
        for r, e in zip(rows, sent):
            r["retrieved"] = e.get("retrieved") is not None
        probe = getattr(provider, "cached_prefix", None)
        if probe is not None and not d.meta.get("adapters") and not self._offers_tools(d.id):
            try:
                prompt, held = probe(req)
            except (ProviderError, ValueError, OSError):
                return rows
            # the system message (system prompt, folder notes, attached context) ends at the
            # prompt's first boundary: the prefix a dialogue's every prompt shares
            if held is not None and prompt.boundaries:
                for r in rows:
                    r["cached"] = held >= prompt.boundaries[0]
        return rows

    def _offers_tools(self, did: str) -> bool:
        """Whether the dialogue's notes and prompts reference kernel functions (&`fn`): their
        specs join its system message, which a probe without a kernel cannot reproduce."""
        from .context import tool_names
        full = self.open(did)
        return bool(full.messages) and bool(tool_names(full, full.messages[-1].id))

    def _prefix_request(self, d: Dialogue, **kw: Any) -> Any:
        """A request for a one-word prompt as the first message of `d`: the system message every
        prompt of `d` starts with (mode, folder notes and attached context included); `kw` go to
        context.build (budget, count_tokens)."""
        from . import context
        from dataclasses import replace
        probe = Message(kind=Kind.prompt, source="?")
        return context.build(replace(d, messages=[probe]), probe.id,
                             folders=self.folder_context(d), **kw)

    def detach(self, ref: str, name: str, *, base_version: int | None = None) -> Dialogue:
        """Remove an attached context item by name; NotFoundError names the ones there are."""
        d = self.open(ref, messages=False)
        if not any(c.name == name for c in d.context):
            there = ", ".join(repr(c.name) for c in d.context) or "none"
            raise NotFoundError(f"no attached item {name!r} in dialogue {d.name!r} "
                                f"(attached: {there})")
        return self.update(d, base_version=base_version,
                           context=[c for c in d.context if c.name != name])

    def import_dialogue(self, doc: Dialogue, *, name: str | None = None,
                        trust: bool = False, on_progress: OnProgress | None = None,
                        folder: str | None = None) -> Dialogue:
        """Store a dialogue read from elsewhere (a notebook), messages and all, in one
        transaction: either all of it is created or nothing is.

        The file is data, not configuration (`trust.vet_import`): its model is kept only when the
        user configured it, its system prompt only with `trust=True`, and its ids never address
        anything (the dialogue gets a fresh id). What was set aside is in the returned dialogue's
        ``meta["import"]``, with ``["warnings"]`` to show the user (`trust.import_record`).
        `on_progress` hears the store write (one transaction: a spinner). `folder` (a path or id,
        the user's choice, never the file's) is where it goes."""
        from .progress import Steps
        from .trust import vet_import
        fid = self.folder_id(folder) if folder else ""
        safe = vet_import(doc, default_model=default_model(), trust=trust).dialogue
        with Steps(on_progress, f"storing {len(safe.messages):,} messages", total=None), self.store.tx():
            d = self.store.create_dialogue(name or safe.name, model=safe.model,
                                           system=safe.system, context=safe.context,
                                           meta=safe.meta, folder=fid)
            self.store.add_messages(d.id, safe.messages, op="import")
        return self.store.get_dialogue(d.id)

    @staticmethod
    def import_record(d: Dialogue) -> dict[str, Any]:
        """What an import set aside (`trust.import_record`): warnings to show, the file's own
        model and system prompt; {} when nothing was."""
        from .trust import import_record
        return import_record(d)

    @staticmethod
    def as_stated(d: Dialogue, *, keep_model: bool = False) -> Dialogue:
        """An imported dialogue as its file stated it, for writing the file back (an executed
        notebook): the system prompt and, unless `keep_model`, the model that the import set
        aside are put back, and the import record is dropped. Changes and returns `d`."""
        from .trust import IMPORT_KEY, import_record
        rec = import_record(d)
        if rec:
            d.meta.pop(IMPORT_KEY, None)
            d.system = rec.get("system", d.system)
            if "model" in rec and not keep_model:
                d.model = rec["model"]
        return d

    def delete(self, ref: str) -> None:
        self.store.delete_dialogue(self.dialogue_id(ref))

    # ------------------------------------------------------------ folders

    def folders(self) -> list[Folder]:
        """Every folder, in path order ("a", "a/b", "c"), each with its count of dialogues."""
        return self.store.folders()

    def folder_id(self, ref: str | Folder) -> str:
        """A folder's id from its path ("a/b") or id; "" or "/" is the top level."""
        return ref.id if isinstance(ref, Folder) else self.store.find_folder(ref)

    def folder(self, ref: str | Folder) -> Folder:
        fid = self.folder_id(ref)
        if not fid:
            raise NotFoundError("the top level is not a folder")
        return self.store.get_folder(fid)

    def new_folder(self, path: str, *, exist_ok: bool = False) -> Folder:
        """Make a folder ("a/b" makes a too when it is missing)."""
        return self.store.create_folder(path, exist_ok=exist_ok)

    def rename_folder(self, ref: str, new_path: str, *, base_version: int | None = None) -> Folder:
        """Rename a folder or move it: `new_path` is its whole new path ("a/c" renames a/b to
        a/c; "c" moves it to the top level), the folders above it made when missing. What it
        holds goes with it."""
        f = self.folder(ref)
        parent_path, _, name = new_path.strip().strip("/").rpartition("/")
        with self.store.tx():
            parent = self.store.create_folder(parent_path, exist_ok=True).id \
                if parent_path.strip() else ""
            return self.store.update_folder(f.id, base_version=base_version, op="rename",
                                            name=name, parent=parent)

    def remove_folder(self, ref: str, *, move_up: bool = False) -> Folder:
        """Delete a folder: only an empty one, unless `move_up` moves its dialogues and folders
        into the folder above it first. Its history stays."""
        return self.store.delete_folder(self.folder(ref).id, move_up=move_up)

    def set_folder(self, ref: str, *, note: str | None = None, template: str | None = None,
                   path: str | None = None, base_version: int | None = None) -> Folder:
        """Set a folder's context note (what every dialogue in it and below it sees first), its
        template (a dialogue's name or id; "" for none) and/or its path (`rename_folder`), in one
        transaction, each change a new version of its settings."""
        f = self.folder(ref)
        changes: dict[str, Any] = {}
        if note is not None:
            changes["note"] = note.replace("\r\n", "\n").rstrip()  # a file's last newline
        if template is not None:
            changes["template"] = self.dialogue_id(template) if template.strip() else ""
        with self.store.tx():
            if path is not None and path.strip().strip("/") != f.path:
                f = self.rename_folder(f.id, path, base_version=base_version)
                base_version = f.version
            return self.store.update_folder(f.id, base_version=base_version, **changes)

    def folder_history(self, ref: str) -> list[Version]:
        return self.store.folder_history(self.folder(ref).id)

    def move_to(self, ref: str, folder: str, *, base_version: int | None = None) -> Dialogue:
        """Move a dialogue into a folder (a path or id; "" or "/" for the top level)."""
        return self.update(ref, base_version=base_version, op="move",
                           folder=self.folder_id(folder))

    def folder_context(self, d: Dialogue) -> list[ContextItem]:
        """The context notes a dialogue sees first: its folder's and those above it, outermost
        first, as context items of kind "folder" named by the folder's path."""
        if not d.folder:
            return []
        return [ContextItem(f.path, f.note, kind="folder")
                for f in self.store.folder_chain(self.store.live_folder(d.folder))
                if f.note.strip()]

    # ------------------------------------------------------------ modes

    MODES = MODES

    def set_mode(self, ref: str, name: str, prompt: str | None = None, *,
                 base_version: int | None = None) -> Dialogue:
        """Put a dialogue in mode `name` (learning, concise, standard): its preset text, or
        `prompt` (an edited text), is appended to the system prompt of every request."""
        d = self.open(ref, messages=False)
        return self.update(d, base_version=base_version, op="mode",
                           meta=with_mode(d.meta, name, prompt))

    # -- document tools: the model reads and edits its own dialogue (doc_tools) ---------------

    @staticmethod
    def document_tools() -> list[tuple[str, str, bool]]:
        """Every document tool: (name, description, reads only), and `doc_tool_groups` the
        names a user may turn on together (read, edit, run, all)."""
        from .doc_tools import TOOLS
        return [(n, desc, ro) for n, (desc, _, ro) in TOOLS.items()]

    @staticmethod
    def doc_tool_groups() -> dict[str, list[str]]:
        from .doc_tools import GROUPS
        return {k: list(v) for k, v in GROUPS.items()}

    def doc_tools(self, ref: str | Dialogue) -> list[str]:
        """The document tools the dialogue's model is offered ([]: off, the default)."""
        from .doc_tools import resolve_enabled
        d = ref if isinstance(ref, Dialogue) else self.open(ref, messages=False)
        return resolve_enabled(d.meta.get("doc_tools"))

    def doc_tools_for(self, ref: str, *, author: str, cause: str = "", enabled: Any = "all"
                      ) -> Any:
        """The document tools over dialogue `ref` acting as `author` (store.AUTHORS) for message
        `cause`: a `doc_tools.DocumentTools` (what an answer's toolbox holds; `dialogue.here`
        uses one from a cell, as author "kernel")."""
        from .doc_tools import DocumentTools
        return DocumentTools(self, self.dialogue_id(ref), author=author, cause=cause,
                             enabled=enabled)

    def set_doc_tools(self, ref: str, tools: Any, *, base_version: int | None = None) -> Dialogue:
        """Turn the document tools on ("all", or tool and group names: a list or "read,find")
        or off (None, False, [], ""). Kept as `meta["doc_tools"]`: "all" or the tool names."""
        from .doc_tools import TOOLS, resolve_enabled
        names = resolve_enabled(tools)  # DocToolError (a ValueError) for an unknown name
        d = self.open(ref, messages=False)
        meta = {k: v for k, v in d.meta.items() if k != "doc_tools"}
        if names:
            meta["doc_tools"] = "all" if names == list(TOOLS) else names
        return self.update(d, base_version=base_version, op="doc tools", meta=meta)

    def restore(self, ref: str) -> Dialogue:
        """Bring back a trashed dialogue by id or by name (the most recently deleted of that name)."""
        trashed = [t for t in self.store.trash() if t.type == "dialogue" and ref in (t.id, t.name)]
        if not trashed:
            raise NotFoundError(f"no dialogue {ref!r} in the trash")
        return self.store.restore_dialogue(trashed[0].id)

    def fork(self, ref: str, at: str, *, name: str | None = None) -> Dialogue:
        did = self.dialogue_id(ref)
        return self.store.fork(did, self.message_id(did, at), name=name)

    def search(self, query: str, *, limit: int = 50, dialogue: str | None = None) -> list[SearchHit]:
        return self.store.search(query, limit=limit,
                                 dialogue_id=self.dialogue_id(dialogue) if dialogue else None)

    def trash(self) -> list[TrashItem]:
        return self.store.trash()

    # ------------------------------------------------------------ MCP servers

    @property
    def mcp(self) -> "MCPPool":
        """The MCP servers this service has started (one per configuration), kept running
        until `shutdown_kernels` / `aclose`."""
        if self._mcp is None:
            from .mcptools import MCPPool
            self._mcp = MCPPool()
        return self._mcp

    @staticmethod
    def mcp_config_path() -> Path:
        """The global MCP servers file (`DIALOGUE_MCP_CONFIG`, else mcp.json beside config.toml)."""
        from .mcptools import global_path
        return global_path()

    def mcp_servers(self, ref: str | Dialogue | None = None, *,
                    known: "dict[str, ServerConfig] | None" = None) -> list[dict[str, Any]]:
        """The MCP servers configured (globally, and `ref`'s own), each as {"name", "origin"
        ("global" or "dialogue"), "transport", "runs" (command line or URL), "enabled" (by
        `ref`), "running"}; a name `ref` enables that is configured nowhere (taken out of the
        global file since) comes last with origin "missing", so it can be seen and disabled. A
        bad config file raises MCPConfigError (a ValueError). `known`: `mcptools.configured`'s
        answer for `ref`, where the caller has it."""
        from . import mcptools
        d = None if ref is None else (ref if isinstance(ref, Dialogue)
                                      else self.open(ref, messages=False))
        on = mcptools.enabled_names(d) if d is not None else []
        out = []
        if known is None:
            known = mcptools.configured(d)
        for name, cfg in known.items():
            conn = self._mcp.peek(cfg) if self._mcp is not None else None
            out.append({"name": name, "origin": cfg.origin, "transport": cfg.transport,
                        "runs": cfg.describe(), "enabled": name in on,
                        "running": bool(conn is not None and conn.running)})
        out += [{"name": n, "origin": "missing", "transport": "", "runs": "configured nowhere",
                 "enabled": True, "running": False} for n in on if n not in known]
        return out

    async def mcp_list(self, ref: str | Dialogue | None = None, name: str | None = None
                       ) -> list[dict[str, Any]]:
        """`mcp_servers` with each server's tools ({"name", "offered_as", "description",
        "reads_only", "parameters"}) or, for one that cannot start, its "error". Starts the
        servers it lists (all, or the one `name`d) in parallel."""
        from . import mcptools
        d = None if ref is None else (ref if isinstance(ref, Dialogue)
                                      else self.open(ref, messages=False))
        cfgs = mcptools.configured(d)
        servers = self.mcp_servers(d, known=cfgs)
        if name is not None:
            servers = [s for s in servers if s["name"] == name]
            if not servers:
                raise NotFoundError(f"no MCP server {name!r} is configured (global file "
                                    f"{mcptools.global_path()}, or the dialogue's own)")

        async def one(s: dict[str, Any]) -> dict[str, Any]:
            if s["name"] not in cfgs:
                return {**s, "tools": [], "error": f"MCP server {s['name']!r} is enabled but "
                        f"configured nowhere (global file {mcptools.global_path()}, or the "
                        "dialogue's own): disable it, or configure it again"}
            try:
                tools = await self.mcp.connection(cfgs[s["name"]]).tools()
            except mcptools.MCPServerError as e:
                return {**s, "running": False, "tools": [], "error": str(e)}
            return {**s, "running": True, "error": None, "tools": [
                {"name": t.name, "offered_as": mcptools.tool_name(s["name"], t.name),
                 "description": t.description, "reads_only": t.reads_only,
                 "parameters": t.parameters} for t in tools]}
        return list(await asyncio.gather(*(one(s) for s in servers)))

    def set_mcp(self, ref: str, *, enable: Iterable[str] = (), disable: Iterable[str] = (),
                servers: dict[str, Any] | None = None, remove: Iterable[str] = (),
                base_version: int | None = None) -> Dialogue:
        """Change which MCP servers the dialogue uses (`enable` / `disable`, names configured
        globally or by the dialogue), and its own servers: `servers` (an mcpServers mapping,
        checked, added or replaced by name) and `remove` (names). A versioned settings change;
        enabling a name configured nowhere is refused (MCPConfigError), and nothing changes (a
        name enabled before and configured nowhere since can still be disabled)."""
        from . import mcptools
        d = self.open(ref, messages=False)
        enable = list(enable)
        meta = mcptools.with_mcp(d.meta, enable=enable, disable=list(disable),
                                 servers=servers, remove=list(remove))
        known = mcptools.configured(Dialogue(name=d.name, id=d.id, meta=meta))
        missing = [n for n in enable if n not in known]
        if missing:
            raise mcptools.MCPConfigError(
                f"MCP server(s) {', '.join(map(repr, missing))} are configured nowhere (global "
                f"file {mcptools.global_path()}, or the dialogue's own: dialogue mcp add)")
        return self.update(d, base_version=base_version, op="mcp", meta=meta)

    # ------------------------------------------------------------ messages

    def add(self, ref: str, kind: str | Kind, source: str = "", *, after: str | None = None,
            before: str | None = None, index: int | None = None,
            images: "Iterable[str | os.PathLike | bytes | tuple[str, bytes]]" = (),
            **fields: Any) -> Message:
        """Add a message. `images` (files, bytes, or (name, bytes)) go into a note or prompt as
        its attachments, each referenced on a line of its own after the text (ImageError for a
        file that is not a PNG, JPEG, GIF or WebP, or is too big; nothing is added then)."""
        did = self.dialogue_id(ref)
        images = list(images)
        if images:
            source, fields["attachments"] = self._with_images(kind, source,
                                                              fields.get("attachments") or {}, images)
        msg = Message(kind=kind, source=source, **fields)
        return self.store.add_message(
            did, msg, after=self.message_id(did, after) if after else None,
            before=self.message_id(did, before) if before else None, index=index)

    @staticmethod
    def _with_images(kind: str | Kind, source: str, attachments: dict[str, Any],
                     images: list[Any]) -> tuple[str, dict[str, Any]]:
        if Kind(kind) not in (Kind.note, Kind.prompt):
            raise ImageError(f"images go in notes and prompts, not in a {Kind(kind).value} message "
                             "(a code cell's images are its outputs)")
        return _images.with_images(source, attachments, images)

    image_ref = staticmethod(_images.image_ref)  # the markdown showing an attachment

    @staticmethod
    def images_of(m: Message) -> list[tuple[str, str, int]]:
        """(name, mime, bytes) of each image attached to a note or prompt, for listings."""
        return [(name, found[0], _images.decoded_size(found[1]))
                for name, bundle in (m.attachments or {}).items()
                if (found := _images.image_of(bundle)) is not None]

    def add_images(self, ref: str, msg: str, images: "Iterable[Any]", *, base_version: int | None,
                   reference: bool = True) -> tuple[Message, list[str]]:
        """Attach `images` (as `add` takes them) to a note or prompt: (the message, the new
        attachments' names). `reference`: also append `![name](attachment:name)` lines to the
        source (the web page puts the reference at the cursor itself, so it passes False)."""
        m = self.message(ref, msg)
        source, atts = self._with_images(m.kind, m.source, m.attachments, list(images))
        names = [n for n in atts if n not in m.attachments]
        changes: dict[str, Any] = {"attachments": atts}
        if reference:
            changes["source"] = source
        return self.edit(ref, m.id, base_version=base_version, **changes), names

    def message(self, ref: str, msg: str) -> Message:
        return self.store.get_message(self.message_id(ref, msg))

    def edit(self, ref: str, msg: str, *, base_version: int | None, prune_attachments: bool = False,
             **changes: Any) -> Message:
        """Change a message. `base_version` is the version the change was based on: a stale one is
        refused with ConflictError. None means "the current one" (one-shot CLI use only).
        `prune_attachments`: a new source drops the images it no longer refers to (as Jupyter
        does when a cell is edited; the history keeps them), what the web editor asks for."""
        mid = self.message_id(ref, msg)
        if base_version is None or (prune_attachments and "source" in changes):
            cur = self.store.get_message(mid)
            base_version = cur.version if base_version is None else base_version
            if prune_attachments and "source" in changes and cur.attachments:
                kept = _images.referenced(changes["source"], cur.attachments)
                if kept != cur.attachments:
                    changes["attachments"] = kept
        return self.store.update_message(mid, base_version=base_version, **changes)

    def set_flags(self, ref: str, msg: str, *, base_version: int | None = None,
                  **flags: bool) -> Message:
        mid = self.message_id(ref, msg)
        if base_version is None:
            base_version = self.store.get_message(mid).version
        return self.store.set_flags(mid, base_version=base_version, **flags)

    def move(self, ref: str, msg: str, *, to: int | None = None, by: int | None = None) -> Message:
        """Move to a 0-based index `to`, or up (`by` < 0) / down (`by` > 0)."""
        mid = self.message_id(ref, msg)
        if (to is None) == (by is None):
            raise StoreError("give exactly one of a target position or a number of places to move")
        return self.store.move_message(mid, to) if to is not None else self.store.move_by(mid, by)

    def delete_message(self, ref: str, msg: str, *, base_version: int | None = None) -> None:
        self.store.delete_message(self.message_id(ref, msg), base_version=base_version)

    def trashed_message(self, ref: str, msg: str) -> TrashItem:
        """A trashed message of the dialogue by id, id prefix, or the position it had: a short
        all-digit `msg` is the place it takes again when restored (`rm scratch 2` then `restore
        scratch 2`); of several trashed messages at that place, the one deleted last."""
        did = self.dialogue_id(ref)
        mine = [t for t in self.store.trash() if t.type == "message" and t.dialogue_id == did]
        msg = str(msg).strip()
        exact = [t for t in mine if t.id == msg]
        if exact:
            return exact[0]
        if msg.isdigit() and len(msg) < 8:
            at = [t for t in mine if t.position == int(msg)]  # newest first
            if at:
                return at[0]
        hits = [t for t in mine if len(msg) >= 4 and t.id.startswith(msg)]
        if len(hits) == 1:
            return hits[0]
        there = ", ".join(f"{t.position} ({t.id})" for t in mine) or "none"
        raise NotFoundError(f"no single message {msg!r} of this dialogue in the trash"
                            + (f": {msg!r} matches {', '.join(t.id for t in hits)}" if hits else
                               f" (trashed messages of this dialogue, by place: {there})"))

    def restore_message(self, ref: str, msg: str) -> Message:
        """Bring a trashed message back to its place (`trashed_message` says which)."""
        return self.store.restore_message(self.trashed_message(ref, msg).id)

    def history(self, ref: str, msg: str) -> list[Version]:
        """Every version of a message, oldest first (the append-only record)."""
        return self.store.history(self.message_id(ref, msg))

    def history_steps(self, ref: str, msg: str) -> list[Any]:
        """The history read as steps (`history.Step`), oldest first: consecutive versions of one
        source are one step (an edit, its run and its result), each with a diff of its source
        against the step before."""
        from .history import steps
        return steps(self.history(ref, msg))

    @staticmethod
    def who(v: Version) -> str:
        """Who made version `v`, in words: "user", "restore", "model, in answer 3f2a91c0",
        "kernel, in cell 8d01bb2e" (history.who)."""
        from .history import who
        return who(v)

    @staticmethod
    def history_note(versions: list[Version]) -> str:
        """What a history showing `versions` should say about restoring: for a message that was
        moved, that a restore brings back content, not place (history.MOVE_NOTE); else ""."""
        from .history import MOVE_NOTE, moved
        return MOVE_NOTE if moved(versions) else ""

    def restore_version(self, ref: str, msg: str, version: int, *,
                        base_version: int | None = None) -> Message:
        """Make an earlier version current again, as a new version. Its source comes back with
        the outputs (or answer) that a run of that source produced, or with none if it never
        ran: never beside the outputs of other code (`history.belonging_state`). Content only:
        the message stays where it is (a move is a version, but restoring one, or one before
        it, does not move the message back)."""
        from .history import belonging_state
        mid = self.message_id(ref, msg)
        if base_version is None:
            base_version = self.store.get_message(mid).version
        try:
            state = belonging_state(self.store.history(mid), version)
        except KeyError:
            raise NotFoundError(f"message {mid!r} has no version {version}") from None
        state["kind"] = Kind(state["kind"])
        return self.store.update_message(mid, base_version=base_version,
                                         op=f"restore:{version}", **state)

    def merge_below(self, ref: str, msg: str, *, base_version: int | None = None) -> Message:
        """Jupyter's Shift+M: the message takes the source of the one below after its own (a new
        line between), and the one below goes to the trash; outputs are cleared (they belong to
        neither source). Code and notes only: a prompt's answer has no place in a merge."""
        did = self.dialogue_id(ref)
        mid = self.message_id(did, msg)
        ms = self.store.messages(did)
        i = next(j for j, m in enumerate(ms) if m.id == mid)
        if i + 1 >= len(ms):
            raise StoreError("there is no message below to merge with")
        a, b = ms[i], ms[i + 1]
        if Kind.prompt in (a.kind, b.kind):
            raise StoreError("prompts are not merged: their answers would be lost")
        if base_version is None:
            base_version = a.version
        src = a.source.rstrip("\n") + "\n" + b.source if a.source and b.source else \
            a.source or b.source
        with self.store.tx():
            merged = self.store.update_message(mid, base_version=base_version, op="merge",
                                               source=src, outputs=[], execution_count=None)
            self.store.delete_message(b.id, base_version=b.version)
        return merged

    def split_at(self, ref: str, msg: str, at: int, *, base_version: int | None = None,
                 source: str | None = None) -> tuple[Message, Message]:
        """Jupyter's split at the cursor: the message keeps its source up to character `at`, a new
        message of the same kind below gets the rest. `source`, when given, is the text the
        cursor was in (an editor's unsaved text), stored as the split's starting point."""
        did = self.dialogue_id(ref)
        mid = self.message_id(did, msg)
        m = self.store.get_message(mid)
        if m.kind == Kind.prompt and m.response:
            raise StoreError("a prompt with an answer is not split: the answer would be lost")
        text = m.source if source is None else source
        if not 0 <= at <= len(text):
            raise StoreError(f"split position {at} is outside the cell (0 to {len(text)})")
        if base_version is None:
            base_version = m.version
        head, tail = text[:at].rstrip("\n"), text[at:].lstrip("\n")
        with self.store.tx():
            first = self.store.update_message(mid, base_version=base_version, op="split",
                                              source=head, outputs=[], execution_count=None)
            second = self.store.add_message(did, Message(kind=m.kind, source=tail), after=mid)
        return first, second


    # ------------------------------------------------------------ kernels

    @property
    def kernels(self) -> "KernelPool":
        if self._kernels is None:
            from .kernel import KernelPool  # jupyter_client is slow to import: only when needed
            self._kernels = KernelPool(idle_timeout=self.kernel_idle_timeout)
        return self._kernels

    async def kernel(self, ref: str) -> "Kernel":
        """The dialogue's kernel, started if need be: the one it chose (`set_kernel`)."""
        did = self.dialogue_id(ref)
        choice = self.kernel_choice(did)
        # dialogue.here in a cell opens this database and edits this dialogue
        env = {"DIALOGUE_DB": str(self.store.path), "DIALOGUE_DIALOGUE": did}
        k = await self.kernels.get(did, choice=choice, env=env)
        self._ran[did] = (choice, k.language_info)  # for exports, after the kernel is gone
        return k

    def kernel_status(self, ref: str) -> str:
        """none (not started) | idle | busy | dead | restarting."""
        did = self.dialogue_id(ref)
        if did in self._restarting:
            return "restarting"
        k = self._kernels.peek(did) if self._kernels else None
        if k is None:
            return "none"
        if not k.is_alive:
            return "dead"
        return "busy" if k.busy else "idle"

    # -- which kernel -------------------------------------------------------------------------

    def kernel_choice(self, ref: str | Dialogue) -> Any:
        """The dialogue's kernel (a `kernel.specs.Choice`: an installed kernelspec, a Python
        interpreter, or the default, the app's own interpreter)."""
        from .kernel.specs import Choice
        d = ref if isinstance(ref, Dialogue) else \
            self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
        return Choice.from_meta(d.meta)

    @staticmethod
    def kernel_specs() -> dict[str, str]:
        """{name: display name} of the Jupyter kernels installed here (`jupyter kernelspec
        list`), any of which a dialogue may choose."""
        from .kernel.specs import installed
        return {name: ks.display_name or name for name, ks in installed().items()}

    @staticmethod
    def gateway_specs(quiet: bool = False) -> dict[str, str]:
        """{name: display name} of the kernels of the gateway the config names (`gateway_url`),
        any of which a dialogue may choose to run on it; {} when none is configured. Raises
        GatewayError (in words) when it cannot be reached or refuses the token. `quiet` (for a
        page's picker): the last answer of the past 30 s, asked with a short timeout, and {}
        (logged) instead of an error."""
        from .config import get
        from .kernel.remote import Gateway, specs_for_picker
        if not get("gateway_url"):
            return {}
        gw = Gateway.configured()
        specs = specs_for_picker(gw) if quiet else gw.specs()
        return {n: str(s.get("display_name") or n) for n, s in specs.items()}

    def set_kernel(self, ref: str, spec: str | None = None, *, python: str | None = None,
                   gateway: str | None = None, base_version: int | None = None) -> Dialogue:
        """Choose the dialogue's kernel: an installed kernelspec by name, or a Python interpreter
        by path (it must have ipykernel: the error says how to install it), or neither: the
        app's own interpreter; or `gateway`, a kernelspec of the configured gateway (asked
        now whether it has one of that name). Checked now; a versioned settings change (a stale `base_version`
        raises ConflictError). A kernel of the old choice is replaced at the next run
        (`use_kernel` replaces it at once)."""
        from .kernel.specs import KEY, Choice, KernelChoiceError, check_python, kernelspec_of
        spec, python = (spec or "").strip() or None, (python or "").strip() or None
        gateway = (gateway or "").strip() or None
        if sum(map(bool, (spec, python, gateway))) > 1:
            raise KernelChoiceError("choose a kernelspec, a Python interpreter or a gateway "
                                    "kernel, not both")
        if gateway:
            from .kernel.remote import Gateway
            Gateway.configured().check_spec(gateway)
            choice = Choice(gateway=gateway)
        elif spec:
            kernelspec_of(spec)
            choice = Choice(spec=spec)
        else:
            choice = Choice(python=check_python(python)) if python else Choice()
        did = self.dialogue_id(ref)
        d = self.store.get_dialogue(did, with_messages=False)
        meta = dict(d.meta)
        if choice.is_default:
            meta.pop(KEY, None)
        else:
            meta[KEY] = choice.to_meta()
        if meta == d.meta:
            return d
        return self.update(d, base_version=base_version, op="kernel", meta=meta)

    async def use_kernel(self, ref: str, spec: str | None = None, *, python: str | None = None,
                         gateway: str | None = None, base_version: int | None = None) -> Dialogue:
        """`set_kernel`, and the dialogue's running kernel (of the old choice) is shut down now;
        refused while one of its cells runs."""
        did = self.dialogue_id(ref)
        k = self._kernels.peek(did) if self._kernels else None
        if k is not None and k.busy:
            raise RunError("A cell is running in this dialogue's kernel: stop it before "
                           "choosing another kernel.")
        # set_kernel starts the chosen interpreter to check it has ipykernel (seconds): off the
        # event loop, which serves every other page and stream meanwhile
        d = await asyncio.to_thread(self.set_kernel, did, spec, python=python, gateway=gateway,
                                    base_version=base_version)
        if k is not None and k.choice != self.kernel_choice(d):
            await self._kernels.shutdown(did)
        return d

    def notebook_kernel(self, ref: str | Dialogue) -> dict[str, Any]:
        """The notebook metadata `kernelspec` and `language_info` for the dialogue: its kernel's
        own kernel_info reply when one has run in this process, else what its kernel choice
        says (the language; for the app's own interpreter, what ipykernel reports)."""
        from .kernel.specs import default_language_info
        d = ref if isinstance(ref, Dialogue) else self.open(ref, messages=False)
        choice = self.kernel_choice(d)
        k = self._kernels.peek(d.id) if self._kernels else None
        ran = (k.choice, k.language_info) if k is not None else self._ran.get(d.id)
        info = dict(ran[1]) if ran is not None and ran[0] == choice else {}
        if not info:
            info = default_language_info() if choice.is_default else {"name": choice.language()}
        return {"kernelspec": choice.kernelspec(), "language_info": info}

    def for_notebook(self, d: Dialogue) -> Dialogue:
        """`d` with the notebook metadata of its kernel (`notebook_kernel`), for writing it as a
        notebook: Jupyter then opens the file without asking which kernel to use. The kernel
        choice itself (a path on this machine) stays out of the file, and so do its MCP servers
        (programs and URLs of this machine, whose env and headers may hold keys). Changes and
        returns `d`."""
        from .kernel.specs import KEY
        from .mcptools import META_KEY
        d.meta = {**{k: v for k, v in d.meta.items() if k not in (KEY, META_KEY)},
                  **self.notebook_kernel(d)}
        return d

    async def interrupt(self, ref: str) -> None:
        k = self._kernels.peek(self.dialogue_id(ref)) if self._kernels else None
        if k is not None:
            await k.interrupt()

    async def restart(self, ref: str) -> None:
        """A fresh kernel for the dialogue (its variables are lost); `kernel_status` says
        "restarting" until the new one is ready."""
        did = self.dialogue_id(ref)
        k = self._kernels.peek(did) if self._kernels else None
        self._restarting.add(did)
        try:
            if k is not None:
                await k.restart()
            await self.kernel(did)  # (a new kernel choice replaces the old kernel here)
        finally:
            self._restarting.discard(did)

    def start_restart(self, ref: str) -> None:
        """`restart` in the background, for a page that shows "restarting" meanwhile; a kernel
        that cannot start says why at the next run."""
        import asyncio
        did = self.dialogue_id(ref)
        if did in self._restarting:
            return
        self._restarting.add(did)  # at once: the page asks for the status right after this

        async def go() -> None:
            with contextlib.suppress(Exception):
                await self.restart(did)
        task = asyncio.get_running_loop().create_task(go())
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    # ------------------------------------------------------------ running messages

    def running(self, msg_id: str) -> bool:
        return self._runs.running(msg_id)

    def start(self, ref: str, msg: str, *, prefill: str | None = None,
              timeout: float | None = None, stdin: Any = False, approve: Any = None,
              tools: bool = True) -> str:
        """Start running a code message in the dialogue's kernel, or sending a prompt to the
        dialogue's model, in the background; returns the message id. The run goes on if every
        listener goes away (a closed tab): what it produces is written to the store as it
        arrives. Listen with `subscribe` or `watch`, stop with `stop`.

        `stdin` says how `input()` (and `getpass()`) in the cell is answered: False (the
        default), it raises StdinNotImplementedError in the cell; True, the run's listeners hear
        an "input" event ({"prompt", "password"}) and one of them answers with `reply_input`;
        a callable `(prompt, password) -> str` (a coroutine function, or a plain one, run in a
        thread) answers, and raising EOFError from it interrupts the cell.

        `approve` says how a prompt's tool calls that need the user's approval are asked
        (approvals.py: reading tools and tools allowed "always" never ask): "ask" (an "approval"
        event; `approve` answers it, as the page does), True (allow all), False or None (nobody
        to ask: denied), or a callable `(call info) -> "once" | "always" | "deny" | bool`.
        `tools=False` offers the model no tools at all."""
        did = self.dialogue_id(ref)
        return self._runs.start(did, self.message_id(did, msg), prefill=prefill, timeout=timeout,
                                stdin=stdin, approve=approve, tools=tools)

    def approve(self, msg_id: str, call_id: str, decision: Any) -> None:
        """Answer the tool call `call_id` that the running answer `msg_id` waits on: "once",
        "always" (this tool in this dialogue, from now on: stored in its settings) or "deny"
        (the model is told "denied by the user" and goes on). ApprovalError if it waits on
        no such call."""
        self._runs.decide(msg_id, call_id, decision)

    def allow_tool(self, ref: str, name: str, allow: bool = True) -> Dialogue:
        """Always allow tool `name` in this dialogue (or stop: `allow=False`), as a new version of
        its settings."""
        from .approvals import with_always
        d = self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
        return self.update(d, meta=with_always(d.meta, name, allow))

    def set_approvals(self, ref: str, *, always: "Iterable[str] | None" = None,
                      ask_reads: bool | None = None, base_version: int | None = None) -> Dialogue:
        """This dialogue's approvals (None: unchanged): the tools `always` allowed without
        asking, and whether tools that only read ask too (`ask_reads`; by default they do not).
        One new version of its settings."""
        from .approvals import settings_of
        d = self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
        s = settings_of(d.meta)
        if always is not None:
            s["always"] = list(dict.fromkeys(str(n) for n in always))
        if ask_reads is not None:
            s["ask_reads"] = bool(ask_reads)
        return self.update(d, base_version=base_version, meta={**d.meta, "approvals": s})

    def reply_input(self, msg_id: str, text: str) -> None:
        """Answer the input() that the running code message `msg_id` waits on (RunError if it
        waits on none)."""
        self._runs.reply(msg_id, text)

    def subscribe(self, msg_id: str) -> AsyncIterator[RunEvent]:
        """Every event of the run of `msg_id` from its first, ending with "done", however late the
        listener comes; nothing if it is not running (read the store for its state)."""
        return self._runs.subscribe(msg_id)

    def watch(self, msg_id: str) -> AsyncIterator[tuple[str, Any]]:
        """What a page shows of a run: ("snapshot", LiveState) with everything so far, then
        ("event", RunEvent) as they come (of consecutive progress reports a listener that fell
        behind gets the latest); nothing if it is not running."""
        return self._runs.watch(msg_id)

    def live(self, msg_id: str) -> LiveState | None:
        """What the run of `msg_id` has produced so far; None if it is not running."""
        return self._runs.live(msg_id)

    async def wait(self, msg_id: str) -> Message:
        return await self._runs.wait(msg_id)

    async def run(self, ref: str, msg: str, *, prefill: str | None = None,
                  timeout: float | None = None, stdin: Any = False, approve: Any = None,
                  tools: bool = True) -> Message:
        """Run a message and wait for the stored result (`stdin`, `approve`, `tools`: see
        `start`)."""
        return await self.wait(self.start(ref, msg, prefill=prefill, timeout=timeout,
                                          stdin=stdin, approve=approve, tools=tools))

    async def stop(self, msg_id: str) -> None:
        """Stop a run: interrupt a running cell, end a model's answer where it is. What was
        produced so far is kept.

        An interrupt is a KeyboardInterrupt, which a cell can catch and ignore, or never see
        (stuck in C code). A cell still running `stop_grace` seconds after the interrupt is
        ended by restarting its kernel: its variables are lost, and the cell's status says so
        (`meta.run.status == "restarted"`, with a message). A cell still waiting for its turn
        behind another run never runs; the other run is left alone."""
        await self._runs.stop(msg_id)

    # -- a dialogue top to bottom -----------------------------------------------------------

    def start_all(self, ref: str, *, code_only: bool = True, above: str | None = None,
                  allow_errors: bool = False, on_start: Any = None,
                  on_done: Any = None, stdin: Any = False, approve: Any = None,
                  tools: bool = True) -> RunAll:
        """Start running the dialogue's code messages (and prompts unless `code_only`) top to
        bottom in the background, only those above `above` when given; each is an ordinary run
        (`watch` it). Stops at the first that does not end well unless `allow_errors`. One at a
        time per dialogue: a second is refused with RunError. Follow it with the returned
        RunAll's `progress()` / `changed()`, stop it with `stop_all`."""
        d, todo = self._todo(ref, code_only, above)
        if not todo:
            raise RunError("There is no code cell to run." if code_only
                           else "There is nothing to run.")
        return self._runs.start_all(d, todo, what="code cell" if code_only else "message",
                                    allow_errors=allow_errors, on_start=on_start,
                                    on_done=on_done, stdin=stdin, approve=approve, tools=tools)

    def _todo(self, ref: str, code_only: bool, above: str | None) -> tuple[Dialogue, list[str]]:
        d = self.open(ref)
        msgs = d.above(self.message_id(d.id, above)) if above else d.messages
        kinds = (Kind.code,) if code_only else (Kind.code, Kind.prompt)
        return d, [m.id for m in msgs if m.kind in kinds and m.source.strip()]

    def run_all_of(self, ref: str, *, finished: bool = False) -> RunAll | None:
        """The dialogue's Run all still in flight, if any; with `finished`, the last one even if
        it is over (a page that connects late hears how it ended)."""
        job = self._runs.alls.get(self.dialogue_id(ref))
        return job if job is not None and (finished or not job.done) else None

    async def stop_all(self, ref: str) -> None:
        job = self.run_all_of(ref)
        if job is not None:
            await job.stop()

    async def run_all(self, ref: str, *, above: str | None = None,
                      stop_on_error: bool = True) -> list[Message]:
        """Run the code messages in order (only those above `above` when given)."""
        if not self._todo(ref, True, above)[1]:
            return []
        job = self.start_all(ref, above=above, allow_errors=not stop_on_error)
        await job.wait()
        return job.results

    run_status = staticmethod(run_status)

    async def run_through(self, ref: str, *, allow_errors: bool = False,
                          on_start: Any = None, on_done: Any = None,
                          stdin: Any = False, approve: Any = None,
                          tools: bool = True) -> list[Message]:
        """The headless run: every code message and prompt, top to bottom, like
        `jupyter nbconvert --execute`. Stops at the first failure unless `allow_errors`; a kernel
        that dies is then replaced by a fresh one for the next message. Returns the failures.
        `on_start(i, n, message)` and `on_done(i, n, stored)` report each message; `stdin`
        answers input() in the cells, `approve` the prompts' tool calls (see `start`)."""
        if not self._todo(ref, False, None)[1]:
            return []
        job = self.start_all(ref, code_only=False, allow_errors=allow_errors,
                             on_start=on_start, on_done=on_done, stdin=stdin, approve=approve,
                             tools=tools)
        return await job.wait()

    @staticmethod
    def resolve_adapters(model: str, adapters: Any) -> dict[str, float]:
        """{name or path: scale} -> {file: scale} for `model`, refusing what does not fit. Pure
        (no store access), so a server may call it in a worker thread."""
        from .llm.base import ProviderError
        from .local.adapters import resolve_set
        if model.startswith(_ENGINES):
            # the engine holds the base: the set's files go to it (llm/engines.py checks them there)
            return resolve_set(adapters)
        if not model.startswith("local:"):
            raise ProviderError(f"adapters apply to local models only (and to the serving "
                                f"engines llama-server: and vllm:), not {model}: choose one or "
                                "clear the dialogue's adapters")
        return resolve_set(adapters, base=model)

    # -- models, the prefix cache, training ----------------------------------------------------

    @staticmethod
    def models() -> list[ModelInfo]:
        """Every model a user can pick, as each provider lists it: local ones (bundled, packaged,
        registered) first, then the hosted ones; `ready` says which work now."""
        from .llm.base import list_models
        return list_models()

    @staticmethod
    def check_model(model: str) -> None:
        """Refuse a model name no provider serves (UnknownModelError, a ProviderError). A missing
        key is not refused: it is reported when a prompt runs."""
        from .llm.base import check_model
        check_model(model)

    @staticmethod
    def add_model(path: str | os.PathLike, *, name: str | None = None,
                  chat_format: str | None = None) -> Any:
        """Register a local GGUF file as `local:<name>` (default: the file's stem); its ModelSpec."""
        from .gguf import models as lm
        return lm.add(name or Path(path).stem, path, chat_format=chat_format)

    @staticmethod
    def add_model_from_hub(repo: str, filename: str, *, name: str | None = None,
                           chat_format: str | None = None) -> Any:
        """Download a GGUF file from a Hugging Face repository and register it (the only call
        that reaches the network, and only when asked)."""
        from .gguf import models as lm
        return lm.add_from_hub(repo, filename, name=name, chat_format=chat_format)

    @staticmethod
    def remove_model(name: str) -> None:
        """Forget a registered local model; its file is left alone."""
        from .gguf import models as lm
        lm.remove(name)

    def load_model(self, ref: str, on_progress: OnProgress | None = None) -> bool:
        """Load a dialogue's local model now, reporting the load to `on_progress` (surfaces that
        show the wait call it before a run; the run would load it anyway). False when the model
        is not local or already loaded."""
        from .llm.base import get_provider
        provider = get_provider(self.open(ref, messages=False).model or default_model())
        load = getattr(provider, "load", None)
        return bool(load(on_progress)) if load is not None else False

    def cache_stats(self) -> Any:
        """The local model's prefix KV cache on disk (`KVCache.stats`): entries, size, limit, each
        model's share, and each saved prefix (its length in tokens, when a prompt last used it,
        and `dialogue`: the name of the dialogue it was saved for, from this database, "" when
        unknown: saved before prefixes were noted, or for a dialogue of another database)."""
        from .local.kvcache import KVCache
        st = KVCache().stats()
        origins = [p["origin"] for ns in st.namespaces for p in ns.get("prefixes", [])
                   if p.get("origin")]
        places = self.store.message_places(sorted(set(origins))) if origins else {}
        for ns in st.namespaces:
            for p in ns.get("prefixes", []):
                did, name, gone = places.get(p.get("origin") or "", ("", "", False))
                p["dialogue"], p["dialogue_id"] = name, did
                if gone:
                    p["dialogue"] += " (in the trash)"
        return st

    @staticmethod
    def clear_cache() -> tuple[int, Path]:
        """Delete every cached prefix state: (how many, the cache folder)."""
        from .local.kvcache import KVCache
        cache = KVCache()
        return cache.clear(), cache.root

    # -- numbers as pictures (charts.py) ----------------------------------------------------

    @staticmethod
    def training_runs() -> list[Any]:
        """The training runs started here (`training_runs.TrainingRun`), newest first."""
        from .training_runs import runs
        return runs()

    @staticmethod
    def training_run(run_id: str) -> tuple[Any, str, list[str]]:
        """A run, its plot (SVG built from its metrics: safe to inline) and its summary lines."""
        from .charts import training_summary, training_svg
        from .training_runs import find, records
        run = find(run_id)
        if run is None:
            raise NotFoundError(f"no training run {run_id!r}")
        recs = records(run)
        return run, training_svg(recs, title=f"training: {run.name}"), training_summary(recs)

    @staticmethod
    def usage_chart(d: Dialogue) -> str | None:
        """Tokens and cost over a dialogue's answers as an SVG (safe to inline); None before
        its first answer. A cost of None (a model with no known price) is drawn as unknown."""
        from .charts import usage_svg
        points = [{k: (m.usage or {}).get(k) for k in ("input", "output", "cache_read", "cost")}
                  for m in d.messages if m.kind == Kind.prompt and m.usage]
        return usage_svg(points) if points else None

    def train(self, argv: list[str]) -> int:
        """`dialogue train ARGS`: fine-tune an adapter on stored dialogues (named in ARGS, read
        through this service). The trainer parses its own arguments; returns its exit status."""
        try:
            from .train.main import train_main
        except ImportError as e:
            raise RunError("training needs the train extra: pip install 'dialogue[train]' "
                           f"({e})") from None
        return train_main(argv, load_dialogues=lambda names: [self.open(n) for n in names],
                          load_history=self.store.history)  # read-only: --preferences' edited answers

    # -- the adapter registry --------------------------------------------------------------

    @staticmethod
    def add_adapter(source: str, *, name: str | None = None, base: str = "default",
                    copy: bool = False, replace: bool = False, on_progress: OnProgress | None = None) -> Any:
        """Register a GGUF LoRA file, a PEFT directory (converted) or a Hub repo for a local
        base model; with `copy` the registry keeps a copy of its own. Its AdapterInfo.
        `on_progress` hears the long steps as `Step`s (progress.py)."""
        from .local import adapters as A
        if copy:
            return A.copy_into_registry(source, name, base=base, replace=replace, on_progress=on_progress)
        return A.add(source, name, base=base, replace=replace, on_progress=on_progress)

    @staticmethod
    def list_adapters() -> list[Any]:
        from .local import adapters as A
        return A.list_adapters()

    @staticmethod
    def adapter_info(name_or_path: str) -> Any:
        """Base, rank, alpha, targets, size and provenance of a registered adapter or a file."""
        from .local import adapters as A
        return A.info(name_or_path)

    @staticmethod
    def remove_adapter(name: str) -> bool:
        """Forget an adapter; its file is deleted only if the registry made it. Returns whether
        it was (a copy or a conversion of the registry's own)."""
        from .local import adapters as A
        managed = A.info(name).managed if name in {x.name for x in A.list_adapters()} else False
        A.remove(name)
        return managed

    @staticmethod
    def merge_adapters(parents: list[str], weights: list[float], out: str, **options: Any) -> Any:
        """Merge adapters into a new registered one (linear, TIES or DARE: `options` as
        `local.adapters.merge` takes them, `on_progress` among them). Models are never merged."""
        from .local import adapters as A
        return A.merge(parents, weights, out, **options)

    # -- adapters ---------------------------------------------------------------------------

    def adapters(self, ref: str) -> dict[str, float]:
        """The dialogue's adapter set {registered name or .gguf path: scale}; 0 = listed but off."""
        return dict(self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
                    .meta.get("adapters") or {})

    def set_adapters(self, ref: str, adapters: Any, *, base_version: int | None = None) -> Dialogue:
        """Choose the dialogue's LoRA adapters: {registered name or .gguf path: scale}.

        Checked now, not at the next prompt: an unknown name raises UnknownAdapterError, an
        adapter that does not fit the dialogue's local model AdapterMismatchError, a non-local
        model with a non-empty set ProviderError. A scale of 0 keeps an adapter listed but off.
        None or {} clears the set. A versioned settings change like a model change; a stale
        `base_version` raises ConflictError."""
        d = self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
        clean: dict[str, float] = {}
        if adapters:
            if not hasattr(adapters, "items"):
                raise _adapter_error()(
                    f"an adapter set is a mapping {{name: scale}}, got {type(adapters).__name__}")
            from .gguf.lora import check_scale
            clean = {str(k).strip(): check_scale(str(k), v) for k, v in adapters.items()}
            if "" in clean:
                raise _adapter_error()("an adapter name cannot be empty")
            self.resolve_adapters(d.model, clean)
        meta = dict(d.meta)
        if clean:
            meta["adapters"] = clean
        else:
            meta.pop("adapters", None)
        return self.update(d, base_version=base_version, op="adapters", meta=meta)

    def adapter_choices(self, ref: str) -> list[Any]:
        """Registered adapters (AdapterInfo) that fit the dialogue's local model; [] for any other
        model. An adapter registered on another file of the same architecture and shapes fits."""
        d = self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
        if d.model.startswith(_ENGINES):  # the engine holds the base: every registered adapter
            from .local import adapters as A
            return A.list_adapters()
        if not d.model.startswith("local:"):
            return []
        from .gguf.lora import AdapterError, read_lora
        from .gguf.models import model_hash
        from .gguf.models import resolve as resolve_model
        from .local import adapters as A
        spec = resolve_model(d.model)
        base_hash = model_hash(spec.path)
        out = []
        for info in A.list_adapters():
            if info.base_hash == base_hash:
                out.append(info)
                continue
            try:
                A.check_against_base(read_lora(info.path), spec)
            except (AdapterError, OSError):
                continue
            out.append(info)
        return out

    def adapter_view(self, ref: str | Dialogue) -> "AdapterView":
        """What an adapter picker shows: the registered adapters that fit the dialogue's local
        model, and why any entry of its set is not among them ("not registered", "does not fit
        local:x", "the file is gone"), so a broken entry is shown rather than silently dropped.
        An unknown local model or an unreadable registry is told on every entry, not raised."""
        d = ref if isinstance(ref, Dialogue) else \
            self.store.get_dialogue(self.dialogue_id(ref), with_messages=False)
        if not d.model.startswith(("local:", *_ENGINES)):
            return AdapterView()
        current = dict(d.meta.get("adapters") or {})
        try:
            choices = self.adapter_choices(d.id)
        except ProviderError as e:
            return AdapterView([], {k: str(e) for k in current})
        names = {c.name for c in choices}
        problems: dict[str, str] = {}
        unknown = [k for k in current if k not in names]
        if unknown:
            from .local.adapters import list_adapters, looks_like_path
            try:
                registered = {a.name for a in list_adapters()}
            except ProviderError:
                registered = set()
            for k in unknown:
                if k in registered:
                    problems[k] = f"does not fit {d.model}"
                elif looks_like_path(k):
                    if not Path(k).expanduser().is_file():
                        problems[k] = "the file is gone"
                else:
                    problems[k] = "not registered"
        return AdapterView(choices, problems)

    async def trial(self, ref: str, source: str, *, adapters: Any,
                    max_tokens: int | None = None) -> AsyncIterator[Any]:
        """Answer `source` as if it were a new prompt at the end of the dialogue, under the given
        adapter set (not the dialogue's), with tools off, storing nothing: the way to compare
        adapter sets side by side before choosing one. Yields the provider's events (TextDelta,
        Usage, Done). Bad input (unknown adapter, wrong base, an unknown model, a context error)
        raises before the first event."""
        d = self.store.get_dialogue(self.dialogue_id(ref))
        async with contextlib.aclosing(self._runs.trial(d, source, adapters=adapters,
                                                        max_tokens=max_tokens)) as evs:
            async for ev in evs:
                yield ev

    async def replay(self, ref: str, msg: str, *,
                     on_text: Callable[[str], Any] | None = None) -> dict[str, Any]:
        """Regenerate prompt `msg`'s answer under the settings its provenance records and compare
        it with the stored one, storing nothing: {"same", "diff", "stored", "replayed",
        "changes" (settings that differ now: a replaced model file, a changed adapter), "notes",
        "usage", "error", "provenance"}. NotFoundError for a message that is not an answered
        prompt; a model or adapter that cannot be used now raises before anything is sent."""
        did = self.dialogue_id(ref)
        d = self.store.get_dialogue(did)
        m = d.message(self.message_id(d, msg))
        if m.kind != Kind.prompt or not (m.response or m.tool_calls):
            raise NotFoundError(f"message {m.id} is not an answered prompt: there is nothing to "
                                "replay")
        return await self._runs.replay(d, m, on_text)

    # -- what was sent -------------------------------------------------------------------------

    def sent_request(self, ref: str, msg: str, *, version: int | None = None) -> dict[str, Any]:
        """The exact request an answer was sent with (`sent.record`, as the run kept it): its
        latest answer's, or answer `version`'s. NotFoundError for a message that is not a prompt
        or whose answer has no record (answered before records were kept, or imported)."""
        did = self.dialogue_id(ref)
        m = self.store.get_message(self.message_id(did, msg))
        if m.kind != Kind.prompt:
            raise NotFoundError(f"message {m.id} is a {m.kind.value} message: only a prompt's "
                                "answer has a request")
        rec = self.store.request_record(m.id, version)
        origin = m.meta.get("forked_from") or m.meta.get("from_template")
        if rec is None and version is None and isinstance(origin, str):
            # a copy (a fork, a template's dialogue) not answered since: its answer is the
            # original's as it was when copied, and so is the request it was sent with
            copied = self.store.get_dialogue(did, with_messages=False).created
            rec = self.store.request_record(origin, before=copied)
            if rec is not None:
                rec = {**rec, "copied_from": origin}
        if rec is None:
            which = f"answer version {version}" if version is not None else "its answer"
            raise NotFoundError(f"no request is recorded for {which} of message {m.id} (answered "
                                "before requests were kept, imported, or not answered yet)")
        return {**rec, "message": m.id}

    async def estimate(self, ref: str, msg: str, *, source: str | None = None) -> dict[str, Any]:
        """What prompt `msg` would send now, before it is sent: {"tokens", "exact", "cached",
        "cached_label", "label", ...} (`sent.estimate`); `source` stands for the prompt's text
        when the user is still typing it. Nothing is evaluated, no kernel is started and no model
        is loaded for it: a local model that is not loaded yet is estimated at about 4 characters
        a token, with its cache unknown. A request that cannot be built gives {"error": why}."""
        from . import context, sent
        from .llm.base import get_provider
        d = self.store.get_dialogue(self.dialogue_id(ref))
        m = d.message(self.message_id(d, msg))
        if m.kind != Kind.prompt:
            raise NotFoundError(f"message {m.id} is a {m.kind.value} message: only a prompt is sent")
        if source is not None:
            d.messages[d.index(m.id)] = m = m.copy(source=source)
        try:
            provider = get_provider(d.model)
        except ProviderError as e:
            return {"error": str(e)}
        runtime = getattr(provider, "runtime", None) if d.model.startswith("local:") else None
        loaded = runtime is not None and runtime.alive
        counting = _Counting(provider, d.model, loaded=runtime is None or loaded)
        try:
            _, req = await self._runs.request(d, m, counting, d.meta.get("adapters"), estimate=True)
        except (ProviderError, context.ContextError, ValueError) as e:
            return {"error": str(e)}
        if d.meta.get("doc_tools"):  # the document tools the answer will be offered too
            req.tools = [*req.tools, *self._runs.toolbox(d, m, None, req).specs]
        refs = context.references(m.source)
        previous = usage = None
        for p in reversed(d.messages[:d.index(m.id)]):
            if p.kind == Kind.prompt and not p.hidden and p.response:
                previous, usage = self.store.request_record(p.id), p.usage
                break
        local = (lambda r: _local_cached(provider, r)) if loaded else None
        return await asyncio.to_thread(sent.estimate, req, provider=counting, previous=previous,
                                       previous_usage=usage, local_cached=local,
                                       unresolved=len(refs.exprs) + len(refs.cmds))


_TOKENS: dict[tuple[str, str], int] = {}  # (model, content hash) -> tokens: counted once


def _count_tokens(model: str, counter: Any, text: str) -> int | None:
    """`text`'s tokens by the model's tokenizer (None when it has none), remembered per model
    and content, so a settings page does not tokenize the same long docs at every look."""
    if counter is None:
        return None
    import hashlib
    key = (model, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    if key not in _TOKENS:
        n = counter(text)
        if n is None:
            return None
        if len(_TOKENS) > 1024:
            _TOKENS.clear()
        _TOKENS[key] = int(n)
    return _TOKENS[key]


def _estimate(text: str) -> int:
    from .context import estimate_tokens
    return estimate_tokens(text)


class _Counting:
    """The provider an estimate builds with. Its tokenizer's counts are remembered per model and
    text (`_ESTIMATE_COUNTS`, the most recent 16,384): between two pauses in typing only the
    prompt changed, so a long dialogue is not counted again message by message. `loaded` False:
    no counts at all, so a local model that is not loaded is never loaded to count."""

    def __init__(self, provider: Any, model: str, loaded: bool = True):
        self._provider, self._model, self._loaded = provider, model, loaded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)

    def count_tokens(self, text: str) -> int | None:
        if not self._loaded:
            return None
        import hashlib
        key = (self._model, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
        with _ESTIMATE_LOCK:
            if key in _ESTIMATE_COUNTS:
                _ESTIMATE_COUNTS.move_to_end(key)
                return _ESTIMATE_COUNTS[key]
        n = self._provider.count_tokens(text)
        if n is not None:
            with _ESTIMATE_LOCK:
                _ESTIMATE_COUNTS[key] = int(n)
                if len(_ESTIMATE_COUNTS) > 16_384:
                    _ESTIMATE_COUNTS.popitem(last=False)
        return n


_ESTIMATE_COUNTS: "OrderedDict[tuple[str, bytes], int]" = OrderedDict()
_ESTIMATE_LOCK = threading.Lock()  # estimates count in worker threads


def _local_cached(provider: Any, req: Any) -> tuple[int, int | None, str]:
    """(the prompt's tokens, how many of them a prefix on the local model's disk KV cache
    holds, a label) for `req`, by the loaded model's own tokenizer and chat template."""
    prompt, held = provider.cached_prefix(req)
    if held is None:
        return len(prompt.tokens), None, "the KV cache is not looked up under an adapter set"
    return len(prompt.tokens), held, "the local model's KV cache on disk"


def __getattr__(name: str) -> Any:
    # KernelError, for surfaces that answer it: its module imports jupyter_client, which is slow
    if name == "KernelError":
        from .kernel import KernelError
        return KernelError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _adapter_error() -> type[Exception]:
    from .gguf.lora import AdapterError
    return AdapterError


_UNSET: Any = object()


def with_generation(meta: dict, *, max_tokens: Any = _UNSET, sampling: Any = _UNSET) -> dict:
    """`meta` with a dialogue's generation settings set and checked: `max_tokens` (a positive
    number of tokens per answer; None = the model's default) and `sampling` (the local model's
    repetition settings, `local.runtime.Sampling` fields; None or {} = the defaults; a dict is
    merged into what is set, a key in it given as None back to its default). Bad values raise ValueError before anything is stored, including
    values a `meta` brings along (an imported notebook's)."""
    from .local.runtime import Sampling
    meta = dict(meta)
    if max_tokens is not _UNSET:
        meta["max_tokens"] = max_tokens
    if meta.get("max_tokens") is None:
        meta.pop("max_tokens", None)
    else:
        v = meta["max_tokens"]
        if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip().isdigit() \
                or not 0 < int(v) <= 1_000_000:
            raise ValueError(f"max_tokens must be a positive whole number of tokens, not {v!r}")
        meta["max_tokens"] = int(v)
    if sampling is not _UNSET:
        # merged into what is set; a key given as None goes back to its default
        merged = {**(meta.get("sampling") or {}), **sampling} if sampling else {}
        meta["sampling"] = {k: v for k, v in merged.items() if v is not None}
    if meta.get("sampling"):
        meta["sampling"] = {k: v for k, v in Sampling.from_dict(meta["sampling"]).to_dict().items()
                            if v != getattr(Sampling, k)}  # what differs from the defaults
    if not meta.get("sampling"):
        meta.pop("sampling", None)
    return meta


def flag_changes(**opts: bool | None) -> dict[str, bool]:
    """The flags that an option set mentions (None = leave as is)."""
    return {f: v for f, v in opts.items() if f in FLAGS and v is not None}
