"""llama.cpp behind an asyncio-friendly runtime: one model load per process, one generation at a
time per model, streaming, prefix reuse from memory and from the persistent KV cache.

Why a thread and not a process: llama-cpp-python calls llama.cpp through ctypes, which releases the
GIL for the duration of each call, so decoding in a worker thread leaves the event loop free, and
the model's memory is shared with the rest of the process (one load for every dialogue).

Reproducibility. Greedy decoding (temperature 0, the default) is deterministic only if the KV
values are computed the same way every time, and llama.cpp's numbers may depend on how a prompt is
split into batches (backends pick kernels by batch size). So a prompt is always evaluated in the
same segments: it is cut at turn boundaries (the `boundaries` of a `Prompt`, see `build_prompt`),
and each segment is fed in chunks of `CHUNK` tokens counted from the segment's start. A prefix
restored from disk or kept in memory always ends on such a boundary, so the state after it is what
a cold run computes, and greedy output with a restored prefix equals greedy output without it, by
construction. (On this CPU build the logits were in fact bitwise identical however the prompt was
split, one or two threads; the rule costs one decode call per segment and keeps the guarantee
where that does not hold.)

Chat formatting: the GGUF's own chat template (Jinja, rendered with llama-cpp-python's
`Jinja2ChatFormatter`) or a built-in one for files that carry none ("gemma", "chatml"). The prompt
is tokenized segment by segment, each segment starting at a turn boundary, so the tokens of a
dialogue's stable prefix never change when a message is appended after it.

LoRA adapters: `set_adapters({path: scale})` applies any set at run time through
llama.cpp's adapter API (no reload of the base), resets the context (KV computed under another set
is not valid) and changes the KV cache namespace, so a prefix is never restored across sets.
"""
from __future__ import annotations

import asyncio
import atexit
import codecs
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Literal, Mapping, Sequence

from ..errors import ContextTooLongError, ProviderError
from .kvcache import (CacheError, KVCache, check_llama_internals, evaluated_tokens, namespace_key, truncate_to)
from ..gguf.lora import AdapterError
from ..gguf.models import ModelSpec, model_hash, resolve
from ..gguf.templates import BUILTIN_TEMPLATES, chat_template

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = [
    "Runtime", "Prompt", "GenStats", "get_runtime", "load_count", "loaded_runtimes",
    "DEFAULT_N_CTX", "CHUNK", "Sampling", "repeating_tail", "model_params",
    "extra_buffers", "gpu_layers", "gpu_offload", "device_text", "quantize",
]

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 8192  # SmolLM2-135M's training context; more only costs memory on this model
SAVE_END_MIN = 256    # new prompt tokens that make the state at a prompt's end worth saving
CHUNK = 128           # prompt tokens per decode call: as fast as larger chunks on CPU, and a cancel
                      # during a long prompt waits for one chunk only


@dataclass
class Prompt:
    """A rendered, tokenized prompt. `boundaries`: token offsets where a turn ends (ascending, each
    < len(tokens)); evaluation segments and cached prefixes start and end only there. `save`: the
    boundaries worth persisting (the end of the system/context block, the end of the last complete
    turn before the prompt)."""

    tokens: list[int]
    boundaries: list[int]
    save: list[int]
    text: str = ""
    # the prompt ends at the assistant's header (no prefill): the next prompt of the dialogue has
    # a boundary exactly here, so the state at the end is worth saving too (see SAVE_END_MIN)
    ends_turn: bool = False
    # the message this prompt answers (a store id), noted beside the prefix states it saves so
    # that `dialogue cache stats` can say which dialogue each belongs to
    origin: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class GenStats:
    """What one generation did. `cached` = prompt tokens not evaluated (restored from disk or kept
    in memory); `restored` = the part of that which came from the disk cache; `saved` = the
    longest prefix newly written to disk."""

    prompt_tokens: int = 0
    cached: int = 0
    restored: int = 0
    saved: int = 0
    generated: int = 0
    stop_reason: str = "end"   # end | max_tokens | stop | cancelled | repetition
    stop_sequence: str = ""
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


# ---------------------------------------------------------------- shared runtimes

_runtimes: dict[tuple[str, int], "Runtime"] = {}
_runtimes_lock = threading.Lock()
_loads = 0


@atexit.register
def _close_all() -> None:
    """Free the in-process models before the interpreter tears llama_cpp's module down: freed
    later, by `Llama.__del__`, they print "Exception ignored ... 'NoneType' object is not
    callable" on the way out."""
    for rt in loaded_runtimes():
        try:
            rt.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def load_count() -> int:
    """How many times this process has loaded a model file (tests check it stays at one per model)."""
    return _loads


def loaded_runtimes() -> list["Runtime"]:
    return list(_runtimes.values())


def shared(registry: dict, lock: threading.Lock, model: str | ModelSpec, n_ctx: int,
           make: Callable[[ModelSpec, int], Any]) -> Any:
    """The one instance per (model file, context size) in `registry`, made by `make` on first use
    (the in-process runtimes here, the model processes in process.py)."""
    spec = model if isinstance(model, ModelSpec) else resolve(model)
    key = (str(spec.path), n_ctx)
    with lock:
        inst = registry.get(key)
        if inst is None:
            inst = registry[key] = make(spec, n_ctx)
        return inst


def get_runtime(model: str | ModelSpec = "default", *, n_ctx: int = DEFAULT_N_CTX) -> "Runtime":
    """The process-wide runtime for a model, loading it on first use. Every dialogue that uses the
    same model file and context size shares it."""
    return shared(_runtimes, _runtimes_lock, model, n_ctx, lambda s, n: Runtime(s, n_ctx=n))


# ---------------------------------------------------------------- the runtime

class Runtime:
    """One loaded GGUF model. Thread-safe: generations are serialized by a lock (one context, one
    KV memory); tokenizing needs only the vocabulary and runs alongside."""

    def __init__(self, spec: ModelSpec, *, n_ctx: int = DEFAULT_N_CTX, cache: KVCache | None = None,
                 n_threads: int | None = None, n_gpu_layers: int | None = None,
                 extra_bufts: bool | None = None, verbose: bool = False,
                 on_load: Callable[[float], None] | None = None):
        """Load `spec`; `on_load(fraction)` hears llama.cpp's load progress (0..1, a few dozen calls)."""
        global _loads
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise ProviderError("local models need llama-cpp-python: pip install llama-cpp-python==0.3.36") from e
        if spec.chat_format is not None and spec.chat_format not in BUILTIN_TEMPLATES:
            raise ProviderError(f"unknown chat format {spec.chat_format!r} for {spec.name}: use one of "
                                f"{', '.join(BUILTIN_TEMPLATES)} or none (the GGUF's own template)")
        self.spec = spec
        self.n_ctx = n_ctx
        threads, batch_threads = _threads(n_threads)
        self.gpu_layers = gpu_layers() if n_gpu_layers is None else n_gpu_layers
        self.extra_bufts = extra_buffers() if extra_bufts is None else extra_bufts
        try:
            with model_params(extra_bufts=self.extra_bufts, on_load=on_load):
                self.llm: Llama = Llama(str(spec.path), n_ctx=n_ctx, n_batch=512, verbose=verbose,
                                        n_threads=threads, n_threads_batch=batch_threads,
                                        n_gpu_layers=self.gpu_layers)
        except (ValueError, RuntimeError) as e:
            raise ProviderError(f"could not load the model {spec.path}: {e}") from e
        if self.llm.model_params.use_extra_bufts != self.extra_bufts:  # pragma: no cover
            raise ProviderError("llama-cpp-python no longer builds its model parameters from "
                                "llama_model_default_params(): the safe load path needs updating")
        _loads += 1
        check_llama_internals(self.llm)
        self.cache = cache if cache is not None else KVCache()
        self.model_hash = model_hash(spec.path)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._lock = threading.RLock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        # Segment ends whose KV in memory was computed canonically (see the module docstring).
        self._mem_bounds: set[int] = set()
        self._adapters: tuple[tuple[str, float], ...] = ()
        self._lora: dict[str, Any] = {}         # content hash -> llama_adapter_lora_p, loaded once
        self._lora_paths: set[str] = set()      # every adapter file applied so far
        self._key: tuple[tuple[str, float], ...] = ()  # (content hash, scale) of the applied set
        self._ns: str | None = None
        self._warned = False
        self._bos_text = self._piece(self.llm.token_bos(), special=True) if self.llm.token_bos() >= 0 else ""
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._formatters: dict[tuple[str | None, bool], Callable[..., Any]] = {}

    # ------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. `special` parses control tokens such as `<|im_start|>`: only for
        text we rendered, never for user text that merely contains such a string."""
        if not text:
            return []
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _piece(self, token: int, special: bool = False) -> str:
        return self._piece_bytes(token, special).decode("utf-8", errors="replace")

    def _piece_bytes(self, token: int, special: bool = False) -> bytes:
        # llama_token_to_piece directly: the wrapper's detokenize strips a leading space after BOS,
        # which is wrong for a piece in the middle of a stream.
        import llama_cpp
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self._piece_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        import llama_cpp
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ------------------------------------------------------------ chat format

    def _formatter(self, chat_format: str | None, add_generation_prompt: bool) -> Callable[..., Any]:
        """llama-cpp-python's Jinja2 chat formatter (sandboxed, with the filters HF templates use)
        for the GGUF's own template (None) or a built-in one, made once per format."""
        key = (chat_format, add_generation_prompt)
        if key not in self._formatters:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            if chat_format is not None:
                if chat_format not in BUILTIN_TEMPLATES:
                    raise ProviderError(f"unknown chat format {chat_format!r} for {self.spec.name}: use one "
                                        f"of {', '.join(BUILTIN_TEMPLATES)} or none (the GGUF's own template)")
            template, _ = chat_template(chat_format, self.llm.metadata.get("tokenizer.chat_template"))
            eos = self._piece(self.llm.token_eos(), special=True) if self.llm.token_eos() >= 0 else ""
            self._formatters[key] = Jinja2ChatFormatter(template, eos, self._bos_text,
                                                        add_generation_prompt=add_generation_prompt)
        return self._formatters[key]

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
               chat_format: str | None | Literal["model"] = "model") -> str:
        """The chat template applied to `messages` (dicts with role and content). `chat_format`
        defaults to the runtime's model spec; None is the GGUF's own template."""
        fmt = self.spec.chat_format if chat_format == "model" else chat_format
        f = self._formatter(fmt, add_generation_prompt)
        try:
            return f(messages=[dict(m) for m in messages]).prompt
        except Exception as e:  # a template may raise_exception() on roles it does not accept
            raise ProviderError(f"the chat template of {self.spec.name} rejected the messages: {e}") from e

    def build_prompt(self, messages: Sequence[Mapping[str, str]], prefill: str = "", *,
                     save_after: Iterable[int] | None = None,
                     chat_format: str | None | Literal["model"] = "model") -> Prompt:
        """Render and tokenize a chat. A boundary follows every message whose rendered prefix is a
        prefix of the whole (true of any ordinary template); when the next turn is the
        assistant's, the boundary goes after that turn's header instead. So the prompt's last
        segment (final message, assistant header, prefill) is one decode call, and it ends exactly
        where the next prompt of the dialogue has a boundary, which lets that prompt reuse it.
        `save_after` lists message indices after which the state is worth persisting; by default
        the system message and the last complete turn before the final message."""
        msgs = [dict(m) for m in messages]
        fmt = self.spec.chat_format if chat_format == "model" else chat_format
        self._formatter(fmt, True)  # an unknown format fails here, before any work
        render = lambda ms, gen: self.render(ms, add_generation_prompt=gen, chat_format=fmt)  # noqa: E731
        full = render(msgs, True) + prefill
        if save_after is None:
            save_after = {0} if msgs and msgs[0].get("role") == "system" else set()
            if len(msgs) >= 2:
                save_after.add(len(msgs) - 2)
        save_idx = set(save_after)
        cuts: list[tuple[int, bool]] = []  # (character offset, persist)
        for k in range(1, len(msgs) + 1):
            with_header = render(msgs[:k], True)
            # the final message ends in the middle of the last segment, not at a boundary; its
            # assistant header is a boundary only when a prefill follows it
            cands = (with_header,) if k == len(msgs) else (with_header, render(msgs[:k], False))
            for c in cands:
                if c and len(c) < len(full) and full.startswith(c):
                    if not cuts or len(c) > cuts[-1][0]:
                        cuts.append((len(c), (k - 1) in save_idx))
                    break
        add_bos = self._add_bos and not (self._bos_text and full.startswith(self._bos_text))
        tokens: list[int] = []
        boundaries: list[int] = []
        save: list[int] = []
        start = 0
        for off, persist in [*cuts, (len(full), False)]:
            tokens += self.tokenize(full[start:off], special=True, add_bos=add_bos and start == 0)
            if off < len(full) and tokens and (not boundaries or len(tokens) > boundaries[-1]):
                boundaries.append(len(tokens))
                if persist:
                    save.append(len(tokens))
            start = off
        boundaries = [b for b in boundaries if b < len(tokens)]
        save = [b for b in save if b in boundaries]
        ends_turn = not prefill and bool(msgs) and msgs[-1].get("role") != "assistant"
        return Prompt(tokens, boundaries, save, full, ends_turn)

    # ------------------------------------------------------------ adapters

    @property
    def adapters(self) -> dict[str, float]:
        return dict(self._adapters)

    def set_adapters(self, adapters: Mapping[str | os.PathLike[str], float] | None) -> None:
        """Apply a set of GGUF LoRA adapters with scales ({} for none) without reloading the base.
        A change resets the context and the cache namespace; the same set again is free."""
        with self._lock:
            self._apply_adapters(adapters or {})

    def _apply_adapters(self, adapters: Mapping[str | os.PathLike[str], float]) -> None:
        import llama_cpp
        norm = tuple(sorted((str(Path(p).expanduser().resolve()), float(s)) for p, s in adapters.items()))
        for p, _ in norm:
            if not Path(p).is_file():
                raise AdapterError(f"no such LoRA adapter file: {p}")
        # Loaded adapters are keyed by content hash (model_hash is cached per path, size and
        # mtime), not by path: a file replaced in place is loaded again, never served stale.
        hashes = [model_hash(p) for p, _ in norm]
        key = tuple(zip(hashes, (s for _, s in norm)))
        if norm == self._adapters and key == self._key:
            return
        for (p, _), h in zip(norm, hashes):
            if h not in self._lora:
                handle = llama_cpp.llama_adapter_lora_init(self.llm.model, p.encode())
                if not handle:
                    raise AdapterError(f"{p} is not a GGUF LoRA adapter for {self.spec.name} "
                                       "(llama.cpp refused it: another architecture or shapes?)")
                self._lora[h] = handle
        n = len(norm)
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(1, n))(*[self._lora[h] for h in hashes])
        scales = (ctypes.c_float * max(1, n))(*[s for _, s in norm])
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr if n else None, n, scales if n else None) != 0:
            raise AdapterError(f"llama.cpp could not apply the adapters {[p for p, _ in norm]}")
        truncate_to(self.llm, 0)  # KV computed under the old set is wrong under the new one
        self._mem_bounds = set()
        self._adapters = norm
        self._key = key
        self._ns = None
        # Free what a replaced file left behind, now that it is detached (freeing an attached
        # adapter crashes llama.cpp). Adapters merely switched off stay loaded: switching back
        # costs nothing.
        live = {model_hash(p) for p in self._lora_paths if Path(p).is_file()} | set(hashes)
        self._lora_paths.update(p for p, _ in norm)
        for h in [h for h in self._lora if h not in live]:
            llama_cpp.llama_adapter_lora_free(self._lora.pop(h))

    @property
    def cache_namespace(self) -> str:
        """The KV cache namespace of the current model + adapter set."""
        if self._ns is None:
            self._ns = namespace_key(self.model_hash, list(self._key))
        return self._ns

    def reset(self) -> None:
        """Forget the context (the next prompt starts cold, or from the disk cache)."""
        with self._lock:
            truncate_to(self.llm, 0)
            self._mem_bounds = set()

    # ------------------------------------------------------------ generation

    def generate(self, prompt: Prompt, *, max_tokens: int = 256, temperature: float = 0.0,
                 stop: Sequence[str] = (), seed: int | None = None, use_cache: bool = True,
                 adapters: Mapping[str | os.PathLike[str], float] | None = None,
                 cancel: threading.Event | None = None,
                 on_text: Callable[[str], None] | None = None,
                 on_progress: Callable[[int, int, float | None], None] | None = None,
                 sampling: Sampling | Mapping[str, Any] | None = None) -> GenStats:
        """Generate in the calling thread (blocking). `on_text` gets each piece of text as soon as
        it is final (text that might be the start of a stop sequence is held back). `adapters`
        None keeps the current set. `cancel` stops within one token (or one prompt chunk).
        `on_progress(read, total, eta_s)` is called while the prompt is read, after each chunk,
        when more than one chunk is left to evaluate. `sampling`: see `Sampling`."""
        if not isinstance(sampling, Sampling):
            sampling = Sampling.from_dict(sampling)
        if len(prompt.tokens) == 0:
            raise ValueError("empty prompt")
        if len(prompt.tokens) >= self.n_ctx:
            raise ContextTooLongError(
                f"the prompt is {len(prompt.tokens)} tokens but {self.spec.name} runs with a context "
                f"of {self.n_ctx}: drop or shorten messages (or attached context)")
        cancel = cancel or threading.Event()
        with self._lock:
            if adapters is not None:
                self._apply_adapters(adapters)
            return self._generate(prompt, max_tokens, temperature, stop, seed, use_cache, cancel,
                                  on_text or (lambda s: None), on_progress, sampling)

    def _generate(self, prompt: Prompt, max_tokens: int, temperature: float, stop: Sequence[str],
                  seed: int | None, use_cache: bool, cancel: threading.Event,
                  on_text: Callable[[str], None],
                  on_progress: Callable[[int, int, float | None], None] | None,
                  sampling: Sampling) -> GenStats:
        llm = self.llm
        t0 = time.perf_counter()
        toks = prompt.tokens
        n = len(toks)
        st = GenStats(prompt_tokens=n)
        bset = set(prompt.boundaries)

        # 1. the longest canonical prefix in memory
        cur = evaluated_tokens(llm)
        common = 0
        for a, b in zip(cur, toks):
            if a != b:
                break
            common += 1
        mem = max((b for b in prompt.boundaries if b <= common and b in self._mem_bounds), default=0)
        # 2. a longer one on disk?
        ns = self.cache_namespace if use_cache else ""
        start = mem
        if use_cache and self.cache.find(ns, toks, bset, min_len=mem + 1):
            got = self.cache.restore(llm, ns, toks, bset, min_len=mem + 1)
            if got:
                start, st.restored = got, got
            else:  # only damaged files: the context was cleared on the way
                start = 0
        elif use_cache:
            self.cache.missed()  # nothing longer on disk: a lookup that found nothing
        if start == mem:
            start = truncate_to(llm, mem)
        st.cached = start
        # what is in memory now is canonical up to `start`, with the prompt's own segment ends
        self._mem_bounds = {b for b in prompt.boundaries if b <= start}

        # 3. evaluate the rest, segment by segment, saving where asked
        ends = [b for b in prompt.boundaries if b > start] + [n]
        pos = start
        report = on_progress if on_progress is not None and n - start > CHUNK else None
        t_read = time.perf_counter()
        if report:
            report(start, n, None)
        for end in ends:
            while pos < end:
                if cancel.is_set():
                    st.stop_reason = "cancelled"
                    st.total_s = time.perf_counter() - t0
                    return st
                step = min(CHUNK, end - pos)
                llm.eval(toks[pos:pos + step])
                pos += step
                if report and pos < n:
                    rate = (pos - start) / max(1e-6, time.perf_counter() - t_read)
                    report(pos, n, (n - pos) / rate)
            self._mem_bounds.add(end)
            # The end of the prompt is saved too when it ends a turn and enough of it was new:
            # the next question's prompt starts with exactly these tokens, so after a restart
            # (or a crash of the model process) it reads only its own turn, not the whole
            # dialogue again. Short reads are not worth a state file (tens of MB).
            at_end = end == n and prompt.ends_turn and n - start >= SAVE_END_MIN
            if use_cache and ((end in prompt.save and end < n) or at_end) \
                    and not self._saved_near(ns, toks, end):
                try:
                    saved = self.cache.save(llm, ns, toks[:end], origin=prompt.origin)
                except CacheError as e:  # an unusable cache dir makes a slower cache, not an error
                    saved = None
                    if not self._warned:
                        log.warning("KV cache disabled for this run: %s", e)
                        self._warned = True
                if saved is not None:
                    st.saved = max(st.saved, end)
                    try:
                        self.cache.describe(ns, {"model": self.spec.name, "path": str(self.spec.path),
                                                 "model_hash": self.model_hash, "adapters": self.adapters})
                    except OSError:
                        pass
        st.prefill_s = time.perf_counter() - t0

        # 4. sample
        budget = max(0, min(max_tokens, self.n_ctx - n))
        sampler = _Sampler(temperature, seed, sampling, self._vocab, self.n_ctx)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        emitted = 0
        hold = max((len(s) for s in stop), default=0)
        try:
            while True:
                if st.generated >= budget:
                    st.stop_reason = "max_tokens"
                    break
                if cancel.is_set():
                    st.stop_reason = "cancelled"
                    break
                tok = sampler.sample(llm)
                if self.is_eog(tok):
                    st.stop_reason = "end"
                    break
                st.generated += 1
                st.tokens.append(tok)
                if sampling.loop_stop and repeating_tail(st.tokens):
                    st.stop_reason = "repetition"
                    text += decoder.decode(self._piece_bytes(tok))
                    break
                text += decoder.decode(self._piece_bytes(tok))
                hit = _find_stop(text, stop, max(0, emitted - hold))
                if hit is not None:
                    i, s = hit
                    if i > emitted:
                        on_text(text[emitted:i])
                    text, emitted = text[:i], i
                    st.stop_reason, st.stop_sequence = "stop", s
                    break
                safe = len(text) - _partial_stop(text, stop)
                if safe > emitted:
                    if not st.ttft_s:
                        st.ttft_s = time.perf_counter() - t0
                    on_text(text[emitted:safe])
                    emitted = safe
                if st.generated < budget and not cancel.is_set():
                    llm.eval([tok])
        finally:
            sampler.close()
        if st.stop_reason != "stop":
            text += decoder.decode(b"", final=True)
            if len(text) > emitted:
                on_text(text[emitted:])
                emitted = len(text)
        if not st.ttft_s:
            st.ttft_s = time.perf_counter() - t0
        st.text = text
        st.total_s = time.perf_counter() - t0
        return st

    def _saved_near(self, ns: str, toks: Sequence[int], end: int) -> bool:
        """Whether the disk cache already holds a prefix of `toks[:end]` no more than
        SAVE_END_MIN tokens short of it. Then a new state file (about 90 MB at 4,000 tokens of
        SmolLM2, written while the user waits for the first token: about 0.15 s here, and disk
        churn on every question) would save a restart at most that many tokens of reading."""
        return any(e.n_tokens >= end - SAVE_END_MIN
                   for e in self.cache.find(ns, toks[:end], min_len=max(1, end - SAVE_END_MIN)))

    async def stream(self, prompt: Prompt, *, cancel: threading.Event | None = None,
                     **kw: Any) -> AsyncIterator[str | GenStats]:
        """Generate in the runtime's worker thread; yield text pieces as they come, then the
        `GenStats`. Closing the iterator or cancelling the task that drives it stops generation
        within a token and waits for the worker to let go of the model, so the next call starts
        at once on a consistent context. Errors (ContextTooLongError, AdapterError) are raised
        here, before any text."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = cancel or threading.Event()

        def put(kind: str, val: Any) -> None:
            loop.call_soon_threadsafe(q.put_nowait, (kind, val))

        def work() -> None:
            try:
                put("done", self.generate(prompt, cancel=cancel, on_text=lambda s: put("text", s), **kw))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting side
                put("error", e)

        fut = self._executor.submit(work)
        try:
            while True:
                kind, val = await q.get()
                if kind == "text":
                    yield val
                elif kind == "done":
                    yield val
                    return
                else:
                    raise val
        finally:
            cancel.set()
            if not fut.cancel() and not fut.done():
                await asyncio.shield(asyncio.wrap_future(fut))

    def close(self) -> None:
        """Free the context and model (detaching adapters first: freeing an attached adapter
        crashes llama.cpp). Only for tests and tools: the shared runtimes live as long as the
        process."""
        import llama_cpp
        with self._lock:
            self._executor.shutdown(wait=True)
            if self._lora:
                llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
                for h in self._lora.values():
                    llama_cpp.llama_adapter_lora_free(h)
                self._lora.clear()
            self.llm.close()
        with _runtimes_lock:
            for k, v in list(_runtimes.items()):
                if v is self:
                    del _runtimes[k]


# ---------------------------------------------------------------- loading safely

# Why no extra buffer types by default. Built from source, llama.cpp targets the build machine's
# CPU; on a Xeon with AMX (Sapphire Rapids) it put the bundled Q4_1 weights in AMX buffers
# ("AMX model buffer size = 95.34 MiB", "amx repack tensor ... of type q4_1") and the first
# llama_decode died with a general protection fault in libggml-cpu.so, whatever the threads, mmap,
# flash-attention or batch settings. With llama_model_params.use_extra_bufts = False (no AMX and no
# CPU_REPACK buffers: weights stay in plain CPU buffers, read in place from the mmap) every path
# worked there. What is lost is weight repacking, which speeds up some types (Q4_0, IQ4_NL, and
# Q4_1 only on AMX) on AVX2 and ARM. Measured with `bench/ttft_bench.py --scenario repack` on an
# AMD EPYC with AVX-512 (December 2026), Q4_0 copy of the bundled model, 512-token prompt, 64 new
# tokens, median of 3 fresh processes: off 316 prompt tok/s / 81.5 decode tok/s, on 419 / 106.7,
# i.e. 1.33x / 1.31x. The bundled Q4_1 model gets no repack buffer on a CPU without AMX (its load
# log shows only CPU_Mapped either way), so the default costs it nothing there. A 1.3x on some
# user models does not buy a crashed answer on others: off by default, `DIALOGUE_LLAMA_REPACK=1`
# turns it back on for whoever wants it (tests/test_model_process.py checks both ways).
_params_lock = threading.Lock()


@contextlib.contextmanager
def model_params(*, extra_bufts: bool, on_load: Callable[[float], None] | None = None) -> Iterator[None]:
    """While loading a `Llama`, make its model parameters use (or not) extra buffer types.

    `Llama()` has no argument for it: it starts from `llama_model_default_params()` and sets the
    fields it knows, so the default is swapped for the duration of the load (under a lock: the
    swap is process-wide). The constructed `Llama.model_params` shows the value in effect, which
    the runtime checks after loading. `on_load(fraction)` becomes llama.cpp's load progress
    callback (`Llama()` does not take one either); an exception in it is logged, not raised
    into C, and the load goes on."""
    import llama_cpp.llama as wrapper
    c = wrapper.llama_cpp
    callback = None
    if on_load is not None:
        def report(fraction: float, _user_data: Any) -> bool:
            try:
                on_load(float(fraction))
            except Exception:  # noqa: BLE001 - never unwind through llama.cpp's C frames
                log.exception("the model load progress callback failed")
            return True  # False would abort the load
        callback = c.llama_progress_callback(report)  # kept alive by this frame for the load
    with _params_lock:
        orig = c.llama_model_default_params

        def params() -> Any:
            p = orig()
            p.use_extra_bufts = extra_bufts
            if callback is not None:
                p.progress_callback = callback
            return p

        c.llama_model_default_params = params
        try:
            yield
        finally:
            c.llama_model_default_params = orig


def extra_buffers() -> bool:
    """Whether models load with extra (repacked, AMX) weight buffers: off unless
    `DIALOGUE_LLAMA_REPACK=1` (see the comment above)."""
    from .. import config
    return config.flag("llama_repack")


def gpu_offload() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU (CUDA, Metal, Vulkan...)."""
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


def gpu_layers() -> int:
    """Layers to offload: `DIALOGUE_GPU_LAYERS` (-1 = all, 0 = none) if set, else all of them when
    the build supports a GPU and none otherwise."""
    env = os.environ.get("DIALOGUE_GPU_LAYERS", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            raise ProviderError(f"DIALOGUE_GPU_LAYERS must be an integer (-1 for all layers), not {env!r}")
    return -1 if gpu_offload() else 0


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str = "q4_0",
             *, requantize: bool = True) -> Path:
    """Write a copy of the GGUF `src` quantized to `ftype` (llama.cpp's quantize API; a quantized
    source is requantized, which loses a little more accuracy). Written beside `dst` and renamed
    into place, so a crash leaves no half file. Used to make a Q4_0 model, the type whose
    repacking the extra-buffers measurement is about."""
    import llama_cpp
    name = f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}"
    if not hasattr(llama_cpp, name):
        raise ValueError(f"unknown quantization type {ftype!r}")
    dst = Path(dst)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, name)
    p.allow_requantize = requantize
    p.nthread = os.cpu_count() or 1
    tmp = dst.with_name(dst.name + ".part")
    from llama_cpp._utils import suppress_stdout_stderr  # llama.cpp logs a line per tensor
    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), p)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ProviderError(f"llama.cpp could not quantize {src} to {ftype}")
    tmp.replace(dst)
    return dst


def device_text(n_gpu_layers: int | None = None) -> str:
    """Where a model runs, in words, without loading it (for `dialogue models`)."""
    n = gpu_layers() if n_gpu_layers is None else n_gpu_layers
    if n == 0 or not gpu_offload():
        return "CPU"
    return "GPU (all layers)" if n < 0 else f"GPU ({n} layers), CPU (the rest)"


# ---------------------------------------------------------------- helpers

def _threads(n: int | None) -> tuple[int, int]:
    """(decode threads, prompt threads). `DIALOGUE_THREADS` or `n` sets both. By default one core
    is left free for the web server and the kernels: ggml's worker threads spin at their barriers,
    so a pool as large as the machine, sharing it with other busy processes, was measured 2-4x
    slower here than one thread fewer."""
    if n is None and os.environ.get("DIALOGUE_THREADS"):
        n = int(os.environ["DIALOGUE_THREADS"])
    if n:
        return n, n
    cpus = os.cpu_count() or 1
    return max(1, cpus // 2), max(1, cpus - 1)


@dataclass(frozen=True)
class Sampling:
    """How a local model picks tokens, beyond temperature. The defaults keep small models out of
    loops: the bundled 135M model once answered with 1,024 tokens of `({}) ({}) ...` (233 s).

    - DRY ("don't repeat yourself", llama.cpp's sampler): a token that would extend a sequence
      already seen in the answer loses `dry_multiplier * dry_base ** (length - dry_allowed_length)`
      of its logit. It leaves ordinary text alone (single repeated words are not sequences) and
      grows fast on a loop. It sees only the answer, not the prompt, so quoting code from the
      dialogue is not penalized.
    - `repeat_penalty` (the classic per-token penalty over the last `repeat_last_n` tokens) is off
      by default: it penalizes every repeated token, which harms code (names recur by design).
    - `loop_stop`: if the answer's tail is one block of tokens repeated (at least 3 times and 48
      tokens in all), generation stops with stop reason "repetition", whatever the samplers did.
    Greedy decoding stays deterministic: the penalties are a function of the answer so far."""

    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    dry_multiplier: float = 0.8
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_last_n: int = -1
    loop_stop: bool = True

    FIELDS = ("repeat_penalty", "repeat_last_n", "dry_multiplier", "dry_base", "dry_allowed_length",
              "dry_last_n", "loop_stop")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Sampling":
        """Settings as stored on a dialogue (`meta["sampling"]`), checked: an unknown key or a
        value out of range is a clear error, not a silent default."""
        if not d:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling settings must be a mapping, not {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {', '.join(unknown)}: known are "
                             f"{', '.join(cls.FIELDS)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            want = type(getattr(cls, k))
            try:
                if want is bool:
                    if not isinstance(v, bool):
                        raise ValueError
                    kw[k] = v
                else:
                    kw[k] = want(v)
            except (TypeError, ValueError):
                raise ValueError(f"sampling setting {k} must be a {want.__name__}, not {v!r}") from None
        s = cls(**kw)
        if s.repeat_penalty <= 0 or s.dry_multiplier < 0 or s.dry_base < 1 or s.dry_allowed_length < 1:
            raise ValueError("sampling settings out of range: repeat_penalty > 0, dry_multiplier >= 0, "
                             "dry_base >= 1, dry_allowed_length >= 1")
        return s

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}


OFF = Sampling(dry_multiplier=0.0, loop_stop=False)  # plain greedy/temperature sampling

# DRY's sequence breakers (llama.cpp's defaults): a repeat never spans one of these, so list
# markers and line starts do not count as a loop.
_DRY_BREAKERS = (b"\n", b":", b"\"", b"*")


def repeating_tail(tokens: Sequence[int], *, min_repeats: int = 3, min_span: int = 48,
                   max_period: int = 64) -> int:
    """The period of a block that the tail of `tokens` repeats (at least `min_repeats` times and
    `min_span` tokens in all), else 0. Cheap enough to run after every token: a period is tried
    only where the last token recurs."""
    n = len(tokens)
    if n < min_span:
        return 0
    last = tokens[-1]
    for p in range(1, min(max_period, n // min_repeats) + 1):
        if tokens[-1 - p] != last:
            continue
        span = max(min_span, p * min_repeats)
        if span > n:
            continue
        tail = tokens[n - span:]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return p
    return 0


class _Sampler:
    """A llama.cpp sampler chain built through the public C API: the repetition samplers of
    `Sampling`, then greedy at temperature 0, else top-k 40 / top-p 0.95 / min-p 0.05 /
    temperature / seeded draw (llama-cpp-python's defaults)."""

    def __init__(self, temperature: float, seed: int | None, sampling: Sampling | None = None,
                 vocab: Any = None, n_ctx_train: int = 0):
        import llama_cpp
        self._c = llama_cpp
        sampling = sampling or Sampling()
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if sampling.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(
                llama_cpp.llama_vocab_n_tokens(vocab), sampling.repeat_last_n, sampling.repeat_penalty, 0.0, 0.0))
        if sampling.dry_multiplier > 0 and vocab is not None:
            breakers = (ctypes.c_char_p * len(_DRY_BREAKERS))(*_DRY_BREAKERS)
            last_n = sampling.dry_last_n if sampling.dry_last_n >= 0 else (n_ctx_train or 4096)
            add(llama_cpp.llama_sampler_init_dry(vocab, sampling.dry_multiplier, sampling.dry_base,
                                                 sampling.dry_allowed_length, last_n,
                                                 breakers, len(_DRY_BREAKERS)))
        if not temperature or temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(40))
            add(llama_cpp.llama_sampler_init_top_p(0.95, 1))
            add(llama_cpp.llama_sampler_init_min_p(0.05, 1))
            add(llama_cpp.llama_sampler_init_temp(float(temperature)))
            add(llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed))

    def sample(self, llm: "Llama") -> int:
        return int(self._c.llama_sampler_sample(self.chain, llm.ctx, -1))

    def close(self) -> None:
        if self.chain is not None:
            self._c.llama_sampler_free(self.chain)
            self.chain = None


def _find_stop(text: str, stop: Sequence[str], start: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in stop:
        if not s:
            continue
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop sequence: that much
    is held back until the next token decides."""
    k = 0
    for s in stop:
        for j in range(min(len(s) - 1, len(text)), k, -1):
            if text.endswith(s[:j]):
                k = j
                break
    return k
