"""What `--load-on-rank0` saves on the other ranks: peak memory per rank of a short FSDP run,
with every rank reading the base itself against rank 0 reading it and broadcasting its weights
(the others build the model on the meta device and hold only their shards).

A Llama-shaped model with random weights (nothing downloaded) is saved once as a Hugging Face
directory; each configuration is one `torchrun --standalone` launch of `dialogue train` (nf4 base,
one step), each rank writing its own peak RSS (and, on a GPU, its peak CUDA memory) at exit:

    python bench/nodes_bench.py [--nproc 2] [--hidden 1024] [--layers 8] [--vocab 32000]

Two processes on one machine run the same code as two machines (`--nnodes`); only the rendezvous
differs.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _record(out: Path) -> None:
    """In a worker: at exit, this rank's peak RSS (and peak CUDA memory) as JSON."""
    def dump() -> None:
        rec = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        import torch
        if torch.cuda.is_available():
            rec["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rec))
    atexit.register(dump)


def _model(d: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dialogue.train.quant import bundled_model_path, load_tokenizer
    tok = load_tokenizer(bundled_model_path())
    cfg = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=hidden * 4,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "docs.md").write_text(" ".join(f"Fact {i}: Quimby has {i * 7 % 13} moons." for i in range(200)))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # in a torchrun worker: where to write
    a, rest = ap.parse_known_args()
    if a.worker:
        _record(a.worker)
        from dialogue.train.main import train_main
        sys.exit(train_main(rest))
    with tempfile.TemporaryDirectory() as tmp:
        d = _model(Path(tmp), a.hidden, a.layers, a.vocab)
        n = sum(f.stat().st_size for f in (d / "model").glob("*.safetensors"))
        print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}: {n / 2**20:.0f} MB of fp32 "
              f"safetensors; nf4 base, {a.nproc} processes, 1 step")
        rows = {}
        for name, flag in (("every rank loads", "--no-load-on-rank0"), ("rank 0 broadcasts", "--load-on-rank0")):
            out = Path(tmp) / name.replace(" ", "-")
            out.mkdir()
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
                   __file__, "--worker", str(out), "--model", str(d / "model"), "--quant", "nf4",
                   "--docs", str(d / "docs.md"), "--seq-len", "64", "--steps", "1", "--rank", "8",
                   "--no-progress", "--no-export", "--out", str(out / "run"), flag]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(a.nproc)]
        keys = ["rss_mb"] + (["cuda_mb"] if "cuda_mb" in rows["every rank loads"][0] else [])
        print(f"{'':20}" + "".join(f"{f'rank {r} {k}':>16}" for k in keys for r in range(a.nproc)))
        for name, recs in rows.items():
            print(f"{name:20}" + "".join(f"{recs[r][k]:16.0f}" for k in keys for r in range(a.nproc)))
        for k in keys:
            base = [r[k] for r in rows["every rank loads"][1:]]
            new = [r[k] for r in rows["rank 0 broadcasts"][1:]]
            print(f"{k} on ranks 1..{a.nproc - 1}: {sum(base) / len(base):.0f} -> {sum(new) / len(new):.0f} MB "
                  f"(saves {(sum(base) - sum(new)) / len(base):.0f} MB per rank, ratio {sum(new) / sum(base):.2f})")


if __name__ == "__main__":
    main()
