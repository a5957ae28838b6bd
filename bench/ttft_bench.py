"""Time to first token with a ~4,000-token attached context: cold, restored from our persistent
prefix KV cache in a fresh process, and llama-cpp-python's own `LlamaDiskCache` in the same run.

The scenario is a dialogue after a restart: the first prompt (question 1) was answered yesterday
and its state saved; today a fresh process answers question 2 over the same context. Every
measurement runs in its own fresh process (model load not counted: it is the same for all), with
the bundled SmolLM2 and greedy decoding, and the prompt tokens are identical for every contender.

    python bench/ttft_bench.py [--context-tokens 4000] [--max-tokens 24] [--scenario NAME ...]

Prints TTFTs, ratios against the cold run measured in the same invocation, cache bytes on disk,
and whether the greedy outputs are identical.

Scenarios (`--scenario`, several allowed; default: restart multiturn):

- restart: the one above.
- multiturn: a dialogue as a user builds it, through the service and the model process: a pinned
  ~4,000-token note, then questions Q1, Q2, Q3 in a row; then a fork of the dialogue at Q1's
  answer, a restart of the model process, and Q2 asked in the fork. For each question: the
  tokens it shares with the previous prompt, how many it reused, and its TTFT as a share of
  Q1's. Goal: >= 95% of shared tokens reused, TTFT <= 10% of Q1's.
- process: per-token streaming cost of the model process: the same greedy generation in this
  process (Runtime) and through ModelProcess, tokens/s interleaved; goal: < 5% slower.
- docs: "keep a library's docs always available": an installed package's documentation as
  `dialogue attach --package` reads it (`--package`, default markdown-it-py; README and API
  docstrings), cut to `--docs-tokens` (default 8,000), attached after the system prompt. Cold
  (no cache) against cached (a fresh process restoring the system message, docs included, that
  an earlier question saved), each in a fresh process with a context of 16,384 tokens; a new
  question each time. Goal: cached TTFT <= 10% of cold. Measured 2026-12-06 on this 2-core
  machine, shared (load average ~12): markdown-it-py's docs cut to 8,019 prefix tokens, cold
  424 s, cached 1.78 s median of 4 (1.13-2.02 s): 238x, greedy output identical; state file
  185 MB. The load inflates the cold figure most; the ratio is the point.
- repack: llama.cpp's extra (repacked) weight buffers on or off, on a Q4_0 copy of the bundled
  model (made with llama.cpp's quantize API): prompt and decode tokens/s. Models load with them
  off by default (runtime.py explains the crash they caused); this says what that costs.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEM = "You are a helpful assistant. Answer using the documentation below."
Q1 = "What does textwrap.dedent do?"
Q2 = "What does json.JSONDecoder.raw_decode return?"


def context_text(n_tokens: int) -> str:
    """Deterministic 'attached documentation': standard-library source, cut to n tokens."""
    import json as j
    import json.decoder
    import json.encoder
    import textwrap
    from dialogue.local.runtime import get_runtime
    text = "\n\n".join(inspect.getsource(m) for m in (textwrap, j.decoder, j.encoder, j))
    rt = get_runtime("default")
    toks = rt.tokenize(text)
    if len(toks) < n_tokens:
        raise SystemExit(f"only {len(toks)} tokens of context text available")
    return rt.detokenize(toks[:n_tokens])


def messages(ctx: str, q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM + "\n\n" + ctx}, {"role": "user", "content": q}]


# ---------------------------------------------------------------- one measurement (child process)

def child(role: str, cache_dir: str, question: str, n_ctx_tokens: int, max_tokens: int) -> dict:
    from dialogue.local.runtime import get_runtime
    t = time.perf_counter()
    rt = get_runtime("default")
    load_s = time.perf_counter() - t
    prompt = rt.build_prompt(messages(context_text(n_ctx_tokens), question))
    first: list[float] = []
    if role in ("ours", "nocache"):
        os.environ["DIALOGUE_CACHE_DIR"] = cache_dir
        t0 = time.perf_counter()
        st = rt.generate(prompt, max_tokens=max_tokens, use_cache=(role == "ours"),
                         on_text=lambda s: first or first.append(time.perf_counter()))
        return {"ttft": first[0] - t0, "total": time.perf_counter() - t0, "tokens": st.tokens,
                "text": st.text, "restored": st.restored, "prompt": len(prompt.tokens), "load_s": load_s}
    # llama-cpp-python's LlamaDiskCache, driven the way its docs show: create_completion
    from llama_cpp.llama_cache import LlamaDiskCache
    llm = rt.llm
    llm.set_cache(LlamaDiskCache(cache_dir=cache_dir, capacity_bytes=8 << 30))
    devnull = open(os.devnull, "w")
    old_err, sys.stderr = sys.stderr, devnull  # it prints a line per save
    try:
        t0 = time.perf_counter()
        toks: list[int] = []
        text = ""
        for chunk in llm.create_completion(prompt.tokens, max_tokens=max_tokens, temperature=0.0,
                                           repeat_penalty=1.0, stream=True):
            if not first and chunk["choices"][0]["text"]:
                first.append(time.perf_counter())
            text += chunk["choices"][0]["text"]
        total = time.perf_counter() - t0
        toks = rt.tokenize(text)
    finally:
        sys.stderr = old_err
    return {"ttft": (first[0] if first else time.perf_counter()) - t0, "total": total, "tokens": toks,
            "text": text, "prompt": len(prompt.tokens), "load_s": load_s}


def run_child(role: str, cache_dir: str, question: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", role, cache_dir, question,
           "--context-tokens", str(args.context_tokens), "--max-tokens", str(args.max_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DIALOGUE_CACHE_DIR": cache_dir})
    if out.returncode != 0:
        raise SystemExit(f"{role} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(d: str) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context-tokens", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3, help="restored runs per contender (median)")
    ap.add_argument("--child", nargs=3, metavar=("ROLE", "DIR", "QUESTION"), help=argparse.SUPPRESS)
    ap.add_argument("--scenario", nargs="+", default=["restart", "multiturn"],
                    choices=["restart", "multiturn", "process", "repack", "docs"])
    ap.add_argument("--package", default="markdown-it-py", help="docs scenario: the package")
    ap.add_argument("--docs-tokens", type=int, default=8000, help="docs scenario: tokens attached")
    ap.add_argument("--docs-child", nargs=4, metavar=("ROLE", "DIR", "QUESTION", "DOCS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--repack-child", nargs=3, metavar=("MODEL", "EXTRA", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        role, d, q = args.child
        print(json.dumps(child(role, d, q, args.context_tokens, args.max_tokens)))
        return
    if args.docs_child:
        role, d, q, docs = args.docs_child
        print(json.dumps(docs_child(role, d, q, Path(docs).read_text(), args.max_tokens)))
        return
    if args.repack_child:
        m, extra, n = args.repack_child
        print(json.dumps(repack_child(m, extra == "1", int(n))))
        return
    ok = True
    for sc in args.scenario:
        ok = {"restart": scenario_restart, "multiturn": scenario_multiturn,
              "process": scenario_process, "repack": scenario_repack,
              "docs": scenario_docs}[sc](args) and ok
        print(flush=True)
    if not ok:
        sys.exit(1)


def scenario_restart(args: argparse.Namespace) -> bool:

    with tempfile.TemporaryDirectory() as tmp:
        ours, ldc, none = (os.path.join(tmp, x) for x in ("ours", "ldc", "none"))
        print(f"context {args.context_tokens} tokens, greedy, {args.max_tokens} new tokens, "
              f"{os.cpu_count()} CPUs; every run in a fresh process; restored runs: median of "
              f"{args.repeat}, ours and LlamaDiskCache interleaved", flush=True)
        cold = run_child("nocache", none, Q2, args)
        print(f"  cold (no cache), Q2, prompt {cold['prompt']} tokens: ttft {cold['ttft']:.3f} s", flush=True)
        ours_fill = run_child("ours", ours, Q1, args)
        print(f"  ours, filling the cache with Q1:       ttft {ours_fill['ttft']:.3f} s", flush=True)
        ldc_fill = run_child("ldc", ldc, Q1, args)
        print(f"  LlamaDiskCache, filling with Q1:       ttft {ldc_fill['ttft']:.3f} s", flush=True)
        ours_bytes, ldc_bytes = dir_bytes(ours), dir_bytes(ldc)
        runs: dict[str, list[dict]] = {"ours Q2": [], "ldc Q2": [], "ours Q1": [], "ldc Q1": []}
        for i in range(args.repeat):
            for key in runs:
                who, q = key.split()
                # a copy per run: LlamaDiskCache pops the entry it restores, and every run must
                # start from the same filled cache
                d = os.path.join(tmp, f"{who}-{q}-{i}")
                shutil.copytree(ours if who == "ours" else ldc, d)
                runs[key].append(run_child(who, d, Q2 if q == "Q2" else Q1, args))
                shutil.rmtree(d)
        t = {k: median([r["ttft"] for r in v]) for k, v in runs.items()}
        for k, v in runs.items():
            each = ", ".join(f"{r['ttft']:.3f}" for r in v)
            print(f"  {k:8s} restored after restart: ttft median {t[k]:.3f} s  (runs {each})", flush=True)

    c = cold["ttft"]
    print()
    print(f"Q2 after a restart (new question, same context):  ours {c / t['ours Q2']:.1f}x faster than cold, "
          f"LlamaDiskCache {c / t['ldc Q2']:.1f}x;  ours / LlamaDiskCache speed {t['ldc Q2'] / t['ours Q2']:.2f}x")
    print(f"Q1 again after a restart (same prompt):           ours {c / t['ours Q1']:.1f}x, "
          f"LlamaDiskCache {c / t['ldc Q1']:.1f}x;  ours / LlamaDiskCache speed {t['ldc Q1'] / t['ours Q1']:.2f}x")
    print(f"bytes on disk after Q1: ours {ours_bytes / 1e6:.1f} MB, LlamaDiskCache {ldc_bytes / 1e6:.1f} MB")
    same = all(r["tokens"] == cold["tokens"] for r in runs["ours Q2"])
    print(f"greedy output identical to cold: ours Q2 {same}; ours Q1 "
          f"{all(r['tokens'] == ours_fill['tokens'] for r in runs['ours Q1'])}; LlamaDiskCache Q2 "
          f"{all(r['text'] == cold['text'] for r in runs['ldc Q2'])}")
    print(f"cold answer: {cold['text']!r}")
    return same


# ---------------------------------------------------------------- multi-turn, through the service

MT_QUESTIONS = ("What does dedent do?", "What does the indent function add to lines?",
                "What is the width argument of fill for?")


def scenario_multiturn(args: argparse.Namespace) -> bool:
    import asyncio

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DIALOGUE_HOME"] = tmp
        os.environ["DIALOGUE_CACHE_DIR"] = os.path.join(tmp, "kv")
        from dialogue import context
        from dialogue.llm.base import get_provider
        from dialogue.local.process import get_model_process
        from dialogue.service import DialogueService
        note = "# textwrap, the module's source\n\n```python\n" + context_text(args.context_tokens) + "\n```"
        svc = DialogueService(os.path.join(tmp, "bench.db"))
        prov = get_provider("local:default")
        mp = get_model_process("default")

        async def ask(did: str, q: str) -> dict:
            m = svc.add(did, "prompt", q)
            d = svc.open(did)
            prompt = prov.build(context.build(d, m.id)).tokens
            t0 = time.perf_counter()
            first: list[float] = []
            await asyncio.sleep(0)
            svc.start(did, m.id)
            async for ev in svc.subscribe(m.id):
                if ev.type == "text" and not first:
                    first.append(time.perf_counter())
                if ev.type == "done":
                    break
            m = svc.message(did, m.id)
            return {"q": q, "prompt": prompt, "ttft": (first[0] if first else time.perf_counter()) - t0,
                    "cached": m.usage.get("cache_read", 0), "answer": m.response, "id": m.id,
                    "stop": m.usage.get("stop_reason")}

        async def run() -> list[tuple[str, dict, list[int]]]:
            d = svc.create("bench", model="local:default", meta={"max_tokens": args.max_tokens})
            n = svc.add(d.id, "note", note)
            svc.set_flags(d.id, n.id, pinned=True)
            out: list[tuple[str, dict, list[int]]] = []
            prev: list[int] = []
            q1 = None
            for i, q in enumerate(MT_QUESTIONS):
                r = await ask(d.id, q)
                q1 = q1 or r
                out.append((f"Q{i + 1}", r, prev))
                prev = r["prompt"]
            # a fork at Q1's answer, a restart of the model process, then Q2 in the fork
            f = svc.fork(d.id, q1["id"], name="bench fork")
            mp.close()
            r = await ask(f.id, MT_QUESTIONS[1])
            out.append(("Q2 in a fork, after a restart", r, q1["prompt"]))
            await svc.aclose()
            return out

        results = asyncio.run(run())
        mp.close()

    q1 = results[0][1]
    print(f"multi-turn through the service and the model process: pinned note of "
          f"{args.context_tokens} tokens, {args.max_tokens} new tokens per answer, greedy")
    ok = True
    for label, r, prev in results:
        shared = 0
        for a, b in zip(prev, r["prompt"]):
            if a != b:
                break
            shared += 1
        reuse = min(r["cached"], shared) / shared if shared else None
        share = r["ttft"] / q1["ttft"]
        line = (f"  {label:30s} prompt {len(r['prompt']):5d}  shared with previous {shared:5d}  "
                f"reused {r['cached']:5d}")
        if reuse is not None:
            line += f" ({reuse:.0%})  ttft {r['ttft']:.2f} s = {share:.1%} of Q1's"
            ok = ok and reuse >= 0.95 and share <= 0.10
        else:
            line += f"          ttft {r['ttft']:.2f} s"
        print(line, flush=True)
    print(f"goal (>= 95% of shared tokens reused, ttft <= 10% of Q1's): {'met' if ok else 'NOT met'}")
    return ok


# ---------------------------------------------------------------- package docs attached

DOCS_N_CTX = 16384
DOCS_QUESTIONS = ("How do I render markdown to HTML?", "Which options does the parser take?",
                  "How do I add a plugin?", "What does the tokenizer return?",
                  "How are tables enabled?")


def docs_child(role: str, cache_dir: str, question: str, docs: str, max_tokens: int) -> dict:
    """One question over the attached docs in this fresh process: `cold` evaluates everything,
    `cached` restores what the disk cache holds (the system message with the docs, saved by an
    earlier question) and evaluates the rest."""
    from dialogue.llm.base import Request, Turn
    from dialogue.llm.local import request_messages
    from dialogue.local.runtime import get_runtime
    os.environ["DIALOGUE_CACHE_DIR"] = cache_dir
    rt = get_runtime("default", n_ctx=DOCS_N_CTX)
    req = Request(model="local:default", system=SYSTEM, context=docs,
                  messages=[Turn(role="user", content=question)], max_tokens=max_tokens)
    msgs, prefill = request_messages(req)
    prompt = rt.build_prompt(msgs, prefill)
    first: list[float] = []
    t0 = time.perf_counter()
    st = rt.generate(prompt, max_tokens=max_tokens, use_cache=(role == "cached"),
                     on_text=lambda s: first or first.append(time.perf_counter()))
    return {"ttft": (first[0] if first else time.perf_counter()) - t0, "prompt": len(prompt.tokens),
            "restored": st.restored, "cached": st.cached, "saved": st.saved, "tokens": st.tokens}


def scenario_docs(args: argparse.Namespace) -> bool:
    from dialogue.local.runtime import get_runtime
    from dialogue.sources import read_package
    loaded = read_package(args.package)  # what `dialogue attach --package` attaches
    rt = get_runtime("default")
    toks = rt.tokenize(loaded.content)
    docs = rt.detokenize(toks[:args.docs_tokens])
    n_docs = len(rt.tokenize(docs))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "docs.txt")
        Path(path).write_text(docs)
        kv = os.path.join(tmp, "kv")

        def child_run(role: str, q: str, cache: str) -> dict:
            cmd = [sys.executable, __file__, "--docs-child", role, cache, q, path,
                   "--max-tokens", str(args.max_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "DIALOGUE_CACHE_DIR": cache})
            if out.returncode != 0:
                raise SystemExit(f"docs {role} failed:\n{out.stderr}")
            return json.loads(out.stdout.strip().splitlines()[-1])

        print(f"package docs attached: {args.package} {loaded.summary()}; cut to {n_docs:,} tokens "
              f"of {len(toks):,}; greedy, {args.max_tokens} new tokens, context {DOCS_N_CTX:,}, "
              f"{os.cpu_count()} CPUs; every run in a fresh process (model load not counted)",
              flush=True)
        qs = DOCS_QUESTIONS
        # the first question with the cache on: read cold, the system message (docs) saved
        fill = child_run("cached", qs[0], kv)
        print(f"  first question, cache on (cold, saving): prompt {fill['prompt']:5d}  ttft "
              f"{fill['ttft']:.2f} s; saved a prefix of {fill['saved']:,} tokens "
              f"({dir_bytes(kv) / 1e6:.1f} MB on disk)", flush=True)
        warm = []
        for q in qs[1:]:
            r = child_run("cached", q, kv)
            warm.append(r)
            print(f"  cached {q!r:42s} prompt {r['prompt']:5d}  restored {r['restored']:5d}  "
                  f"ttft {r['ttft']:.2f} s", flush=True)
        # the baseline: the second question again with no cache at all, in a fresh process
        cold = child_run("cold", qs[1], os.path.join(tmp, "none"))
        print(f"  cold   {qs[1]!r:42s} prompt {cold['prompt']:5d}  ttft {cold['ttft']:.2f} s",
              flush=True)
    c = cold["ttft"]
    w = median([r["ttft"] for r in warm])
    same = warm[0]["tokens"] == cold["tokens"]  # the same question, cold and cached
    print(f"ttft: cold {c:.2f} s, cached (median of {len(warm)}) {w:.3f} s: {c / w:.0f}x faster "
          f"({w / c:.1%} of cold; goal <= 10%); greedy output identical cold and cached: {same}")
    return w / c <= 0.10 and same


# ---------------------------------------------------------------- the model process's cost

def scenario_process(args: argparse.Namespace) -> bool:
    from dialogue.local.process import ModelProcess
    from dialogue.gguf.models import resolve
    from dialogue.local.runtime import OFF, Runtime
    spec = resolve("default")
    rt = Runtime(spec)
    mp = ModelProcess(spec)
    mp.start()
    msgs = [{"role": "system", "content": "You are a storyteller."},
            {"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    prompt = rt.build_prompt(msgs)
    n = 128
    rates: dict[str, list[float]] = {"in-process": [], "model process": []}
    texts = {}
    for _ in range(args.repeat):
        for who, eng in (("in-process", rt), ("model process", mp)):
            eng.reset()
            eng.generate(prompt, max_tokens=1, use_cache=False, sampling=OFF)  # prompt in memory
            t: list[float] = []
            st = eng.generate(prompt, max_tokens=n, use_cache=False, sampling=OFF,
                              on_text=lambda s: t.append(time.perf_counter()))
            if len(t) > 1:
                rates[who].append((len(t) - 1) / (t[-1] - t[0]))
            texts[who] = st.text
    mp.close()
    rt.close()
    a, b = median(rates["in-process"]), median(rates["model process"])
    print(f"streaming {n} tokens, greedy, prompt in memory; median of {args.repeat} interleaved runs")
    print(f"  in-process: {a:.1f} pieces/s   model process: {b:.1f} pieces/s   "
          f"overhead {(a / b - 1):+.1%} per piece (goal < 5%)")
    print(f"  same text both ways: {texts['in-process'] == texts['model process']}")
    return texts["in-process"] == texts["model process"]


# ---------------------------------------------------------------- extra buffers (repacking)

def make_q4_0(dst: Path) -> Path:
    """A Q4_0 copy of the bundled model (requantized from its Q4_1)."""
    from dialogue.gguf.models import bundled_model_path
    from dialogue.local.runtime import quantize
    return dst if dst.exists() else quantize(bundled_model_path(), dst, "q4_0")


def repack_child(model: str, extra: bool, n: int) -> dict:
    from dialogue.gguf.models import ModelSpec
    from dialogue.local.runtime import OFF, Runtime
    rt = Runtime(ModelSpec("q4_0", Path(model), "path"), extra_bufts=extra)
    text = context_text(512)
    prompt = rt.build_prompt([{"role": "user", "content": text + "\nSummarize."}])
    t0 = time.perf_counter()
    st = rt.generate(prompt, max_tokens=1, use_cache=False, sampling=OFF)
    pp = len(prompt) / (time.perf_counter() - t0)
    t: list[float] = []
    st = rt.generate(prompt, max_tokens=n, use_cache=False, sampling=OFF,
                     on_text=lambda s: t.append(time.perf_counter()))
    tg = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0
    return {"pp": pp, "tg": tg, "extra": bool(rt.llm.model_params.use_extra_bufts), "text": st.text}


def scenario_repack(args: argparse.Namespace) -> bool:
    cache = Path(tempfile.gettempdir()) / "dialogue-bench"
    cache.mkdir(exist_ok=True)
    model = make_q4_0(cache / "smollm2-135m-q4_0.gguf")
    res: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeat):
        for extra in (False, True):
            out = subprocess.run([sys.executable, __file__, "--repack-child", str(model),
                                  "1" if extra else "0", "64"], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"repack child failed:\n{out.stderr[-2000:]}")
            res[extra].append(json.loads(out.stdout.strip().splitlines()[-1]))
    pp = {k: median([r["pp"] for r in v]) for k, v in res.items()}
    tg = {k: median([r["tg"] for r in v]) for k, v in res.items()}
    print(f"Q4_0 SmolLM2, 512-token prompt, 64 new tokens, each run a fresh process; median of {args.repeat}")
    print(f"  extra buffers off (default): prompt {pp[False]:.0f} tok/s, decode {tg[False]:.1f} tok/s")
    print(f"  extra buffers on:            prompt {pp[True]:.0f} tok/s, decode {tg[True]:.1f} tok/s")
    print(f"  on / off: prompt {pp[True] / pp[False]:.2f}x, decode {tg[True] / tg[False]:.2f}x")
    return True


if __name__ == "__main__":
    main()
