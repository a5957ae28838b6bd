"""Time to first token with a ~4,000-token attached context: cold, restored from our persistent
prefix KV cache in a fresh process, and llama-cpp-python's own `LlamaDiskCache` in the same run.

The scenario is a dialogue after a restart: the first prompt (question 1) was answered yesterday
and its state saved; today a fresh process answers question 2 over the same context. Every
measurement runs in its own fresh process (model load not counted: it is the same for all), with
the bundled SmolLM2 and greedy decoding, and the prompt tokens are identical for every contender.

    python bench/ttft_bench.py [--context-tokens 4000] [--max-tokens 24]

Prints TTFTs, ratios against the cold run measured in the same invocation, cache bytes on disk,
and whether the greedy outputs are identical.
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
    args = ap.parse_args()
    if args.child:
        role, d, q = args.child
        print(json.dumps(child(role, d, q, args.context_tokens, args.max_tokens)))
        return

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
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
