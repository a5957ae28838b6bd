"""The GPU benchmark's code path, shape-checked on CPU with a tiny Llama-3-shaped model."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llama3_8b_flops_count():
    b = _bench_module()
    cfg = b.llama3_8b_config(dry_run=False)
    # 32 blocks of matmuls plus the LM head: ~7.5e9 weights; 4 FLOPs per weight per token (frozen base)
    matmul_weights = (b.model_flops_per_token(cfg, 1) - 2 * 32 * 2 * 4096) / 4
    assert matmul_weights == pytest.approx(7.5e9, rel=0.01)
    assert b.gpu_peak_tflops(500.0) == (500.0, "given")


@pytest.mark.slow
def test_gpu_mode_dry_run_on_cpu():
    out = subprocess.run([sys.executable, str(BENCH), "--gpu", "--dry-run", "--steps", "1", "--seq", "32", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(rows) == {"peft-lora-nf4", "ours-lora-nf4", "peft-dora-nf4", "ours-dora-nf4"}
    assert all(r["tokens_per_s"] > 0 and r["first_batch_loss"] > 0 for r in rows.values())
    # same random base, same batch: every implementation starts from the same loss
    losses = [r["first_batch_loss"] for r in rows.values()]
    assert max(losses) - min(losses) < 1e-4
