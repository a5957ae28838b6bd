"""Serving engines that apply a dialogue's adapter set where the model is served.

Both speak OpenAI's Chat Completions (this is `OpenAIProvider` in compatible mode, with its key
rules: the OpenAI-compatible key is sent only to base URLs listed in
``OPENAI_COMPATIBLE_BASE_URL``); what they add is the adapters.

``llama-server:<url>`` — llama.cpp's own server (`llama-server --lora a.gguf --lora b.gguf`). It
loads its adapters at start and takes a per-request list of ``{id, scale}``: exactly our sets with
scales, on the quantized base, never merged. Each answer sends the set with every adapter the
server holds (the ones not in the set at scale 0: the server keeps the previous request's scales
for a request that lists none), matched to the server's list (`GET /lora-adapters`) by file
content hash (`gguf.models.model_hash`) where the server's file can be read from here, else by
file name, said in the error when an adapter is missing. ``cache_prompt`` keeps llama.cpp's
prompt cache (a change of adapter set clears the slot's cache: the server's rule). Without a
temperature the answer is greedy, as a local model's is (the server's own default samples).

``vllm:<url>#<base model id>`` — vLLM (SGLang has the same endpoints): one adapter per request, by
name. A set becomes one adapter: the exact linear merge of its files with their scales
(`local.merge.merge_files`, rank = the sum of the ranks, so nothing is approximated), written as
a PEFT directory (`gguf.lora.gguf_to_peft`) named by the content hash of the set
(``dlg-<16 hex>``), loaded once with ``POST /v1/load_lora_adapter`` (vLLM started with
``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) and then asked for as the
request's ``model``. The server reads the directory itself, so it must be on a path the server
sees: `DIALOGUE_ENGINE_ADAPTER_DIR` (default: ``engine-adapters`` in the data dir, right when the
server runs on this machine or shares that disk). The merged rank must fit the server's
``--max-lora-rank`` (`DIALOGUE_VLLM_MAX_LORA_RANK`, vLLM's default 16), checked before anything is
written or sent; a server's own refusal is reported as it said it. The base GGUF the adapters
were made for is needed to name PEFT modules: the base each adapter was registered for
(`dialogue adapters add ... --base`); an adapter given by path alone is refused with that advice.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import httpx2 as httpx  # the HTTP client the SDKs bring (a declared dependency)

from ..gguf.lora import AdapterError as AdapterSetError
from .base import Event, ProviderError, Request, UnknownModelError, register
from .catalog import COMPATIBLE
from .openai import OpenAIProvider

__all__ = ["LLAMA_SERVER", "VLLM", "LlamaServerProvider", "VLLMProvider", "parse_engine",
           "set_name", "MAX_RANK_ENV", "ADAPTER_DIR_ENV"]

LLAMA_SERVER = "llama-server:"
VLLM = "vllm:"
MAX_RANK_ENV = "DIALOGUE_VLLM_MAX_LORA_RANK"
ADAPTER_DIR_ENV = "DIALOGUE_ENGINE_ADAPTER_DIR"
_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


def parse_engine(model: str) -> tuple[str, str, str]:
    """``llama-server:<url>`` or ``vllm:<url>#<model id>`` -> (prefix, root URL without a
    trailing slash or ``/v1``, model id or ""). UnknownModelError with the expected shape."""
    prefix = LLAMA_SERVER if model.startswith(LLAMA_SERVER) else VLLM
    rest = model[len(prefix):]
    root, _, mid = rest.partition("#")
    root = root.strip().rstrip("/").removesuffix("/v1")
    ok = root.startswith(("http://", "https://")) and len(root.split("://", 1)[1]) > 0
    if not ok or (prefix == VLLM and not mid.strip()):
        shape = ("llama-server:http://127.0.0.1:8080" if prefix == LLAMA_SERVER
                 else "vllm:http://gpu-box:8000#meta-llama/Llama-3.1-8B-Instruct")
        raise UnknownModelError(f"cannot read {model!r}: write it like {shape}")
    return prefix, root, mid.strip()


def _hash(path: str) -> str | None:
    from ..gguf.models import model_hash_or_none
    return model_hash_or_none(path)


def set_name(files: dict[str, float]) -> str:
    """The name a merged set is loaded under: a hash of each file's content hash and its scale,
    in a stable order, so one set is loaded once and a changed file is a new adapter."""
    items = sorted((_hash(p) or p, float(s)) for p, s in files.items())
    return "dlg-" + hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


class _Engine(OpenAIProvider):
    """OpenAIProvider in compatible mode against `root`/v1, adding fields to each body."""

    engine = ""

    def __init__(self, model: str) -> None:
        prefix, root, mid = parse_engine(model)
        super().__init__(f"{COMPATIBLE}{root}/v1#{mid or 'default'}")
        self.full_name, self.root, self.name = model, root, self.engine
        self.extra: dict[str, Any] = {}  # what the next body carries besides OpenAI's fields

    def build_body(self, request: Request) -> dict[str, Any]:
        body = super().build_body(request)
        if self.extra:
            body["extra_body"] = dict(self.extra)
        return body

    async def _get(self, path: str) -> Any:
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT) as c:
                r = await c.get(self.root + path, headers={"Authorization": f"Bearer {self._key()}"})
        except httpx.HTTPError as e:
            raise ProviderError(f"{self.engine} at {self.root} did not answer {path}: {e}") from e
        if r.status_code != 200:
            raise ProviderError(f"{self.engine} at {self.root} answered {path} with HTTP "
                                f"{r.status_code}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError as e:
            raise ProviderError(f"{self.engine} at {self.root}: {path} is not JSON") from e


class LlamaServerProvider(_Engine):
    """llama.cpp's server, the adapter set sent with each request (see the module docstring)."""

    engine = "llama-server"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._model_id: str | None = None

    async def server_adapters(self, hashes: bool = True) -> list[dict[str, Any]]:
        """The server's adapters: [{id, path, scale, hash (None when its file is not readable
        here, or not asked for)}]."""
        got = await self._get("/lora-adapters")
        if not isinstance(got, list):
            raise ProviderError(f"llama-server at {self.root}: /lora-adapters is not a list")
        out = []
        for a in got:
            p = str(a.get("path", ""))
            out.append({"id": int(a.get("id", len(out))), "path": p, "scale": a.get("scale"),
                        "hash": await asyncio.to_thread(_hash, p) if p and hashes else None})
        return out

    async def lora_field(self, files: dict[str, float]) -> list[dict[str, Any]]:
        """The request's `lora` list for the set {file: scale}: every server adapter, at its
        scale in the set or 0. AdapterSetError names each adapter the server does not hold."""
        held = await self.server_adapters()
        scales = {a["id"]: 0.0 for a in held}
        missing = []
        for path, scale in files.items():
            h = await asyncio.to_thread(_hash, path)
            match = next((a for a in held if a["hash"] and a["hash"] == h), None)
            if match is None:  # the server's file is not readable here: its name is all we have
                match = next((a for a in held if a["hash"] is None
                              and os.path.basename(a["path"]) == os.path.basename(path)), None)
            if match is None:
                missing.append(f"{os.path.basename(path)} (content {str(h)[:12]})")
            else:
                scales[match["id"]] = float(scale)
        if missing:
            has = ", ".join(os.path.basename(a["path"]) for a in held) or "none"
            raise AdapterSetError(
                f"llama-server at {self.root} does not hold the adapter{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} (it was started with: {has}); start it with "
                f"--lora <file> for each adapter of the set")
        return [{"id": i, "scale": s} for i, s in sorted(scales.items())]

    def build_body(self, request: Request) -> dict[str, Any]:
        body = super().build_body(request)
        if request.temperature is None:
            # greedy, as the local provider answers by default (llama-server samples at 0.8)
            body["temperature"] = 0.0
        return body

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        if self._model_id is None:
            got = await self._get("/v1/models")
            data = got.get("data") if isinstance(got, dict) else None
            self._model_id = str(data[0].get("id")) if data else "default"
        self.model = self._model_id
        files = dict(request.meta.get("adapters") or {})
        held = None if not files else await self.lora_field(files)
        if held is None:  # no set: every adapter the server holds at 0, not the last request's
            held = [{"id": a["id"], "scale": 0.0} for a in await self.server_adapters(hashes=False)]
        self.extra = {"cache_prompt": True, **({"lora": held} if held else {})}
        async for ev in super().stream(request):
            yield ev


class VLLMProvider(_Engine):
    """vLLM or SGLang, a set sent as one merged adapter loaded by name (module docstring)."""

    engine = "vllm"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.base_model = self.model
        self._loaded: set[str] = set()

    @staticmethod
    def max_rank() -> int:
        raw = os.environ.get(MAX_RANK_ENV, "16")
        try:
            return int(raw)
        except ValueError:
            raise ProviderError(f"{MAX_RANK_ENV} must be a whole number, got {raw!r}") from None

    @staticmethod
    def adapter_dir() -> Path:
        raw = os.environ.get(ADAPTER_DIR_ENV)
        if raw:
            return Path(raw).expanduser()
        from ..gguf.models import data_dir
        return data_dir() / "engine-adapters"

    def export(self, files: dict[str, float], base_gguf: str) -> tuple[str, Path]:
        """The set {file: scale} as one PEFT directory, made once: (name, directory). Refuses a
        merged rank over the server's limit before writing anything."""
        from ..gguf.lora import gguf_to_peft, read_lora
        from ..local.merge import merge_files
        rank = sum(max(read_lora(p).ranks) for p in files)
        limit = self.max_rank()
        if rank > limit:
            raise AdapterSetError(
                f"the adapter set merges to rank {rank} (the sum of its adapters' ranks), over the "
                f"server's --max-lora-rank {limit} ({MAX_RANK_ENV}): start vLLM with "
                f"--max-lora-rank {rank} or more, or merge the set to a lower rank first "
                "(`dialogue adapters merge --rank`)")
        name = set_name(files)
        out = self.adapter_dir() / name
        if (out / "adapter_config.json").is_file():
            return name, out
        out.parent.mkdir(parents=True, exist_ok=True)
        merged = out.parent / f".{name}.gguf"
        try:
            merge_files(list(files), list(files.values()), merged, method="linear", dtype="f32")
            gguf_to_peft(merged, out, base_gguf, base_model=self.base_model)
        finally:
            merged.unlink(missing_ok=True)
        return name, out

    async def loaded(self) -> set[str]:
        """Adapter names the server lists beside its base model (`GET /v1/models`)."""
        got = await self._get("/v1/models")
        return {str(m.get("id")) for m in (got.get("data") or []) if m.get("parent")} \
            if isinstance(got, dict) else set()

    async def load(self, name: str, path: Path) -> None:
        if name in self._loaded or name in await self.loaded():
            self._loaded.add(name)
            return
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=5.0)) as c:
                r = await c.post(self.root + "/v1/load_lora_adapter",
                                 json={"lora_name": name, "lora_path": str(path)},
                                 headers={"Authorization": f"Bearer {self._key()}"})
        except httpx.HTTPError as e:
            raise ProviderError(f"vllm at {self.root} did not answer /v1/load_lora_adapter: {e}") from e
        if r.status_code != 200 and "already" not in r.text:
            raise AdapterSetError(f"vllm at {self.root} refused to load the adapter set {name}: "
                                  f"HTTP {r.status_code}: {r.text[:500]} (is it running with "
                                  "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?)")
        self._loaded.add(name)

    @staticmethod
    def base_gguf(files: dict[str, float]) -> str:
        """The base GGUF the set's adapters were registered for (one base for all of them)."""
        from ..gguf.models import resolve
        from ..local.adapters import list_adapters
        by_path = {os.path.realpath(a.path): a for a in list_adapters()}
        bases = set()
        for p in files:
            a = by_path.get(os.path.realpath(p))
            if a is None:
                raise AdapterSetError(
                    f"{os.path.basename(p)} is not a registered adapter, so its base model is unknown "
                    "and its modules cannot be named for vLLM: `dialogue adapters add` it with --base")
            bases.add(a.base)
        if len(bases) != 1:
            raise AdapterSetError(f"the set's adapters were made for different bases ({', '.join(sorted(bases))}); "
                                  "one merged adapter needs one base")
        return str(resolve(bases.pop()).path)

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        files = dict(request.meta.get("adapters") or {})
        self.model = self.base_model
        if files:
            base = await asyncio.to_thread(self.base_gguf, files)
            name, path = await asyncio.to_thread(self.export, files, base)
            await self.load(name, path)
            self.model = name
        async for ev in super().stream(request):
            yield ev


def _llama_server(model: str) -> LlamaServerProvider:
    return LlamaServerProvider(model)


def _vllm(model: str) -> VLLMProvider:
    return VLLMProvider(model)


register(LLAMA_SERVER, _llama_server)
register(VLLM, _vllm)
