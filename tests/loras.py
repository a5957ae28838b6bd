"""Small GGUF LoRA files with random factors that fit the bundled SmolLM2 base: real files that
llama.cpp loads, for tests whose point is not what an adapter learned (registry, choosing a set,
comparing sets). Tests that need a learned effect train one with `dialogue train`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# SmolLM2-135M: 30 blocks, hidden 576, 3 KV heads of 64 (k/v out 192), MLP 1536
SHAPES = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576), "attn_output": (576, 576),
          "ffn_gate": (1536, 576), "ffn_up": (1536, 576), "ffn_down": (576, 1536)}  # (out, in)


def random_factors(seed: int, rank: int, kinds=("attn_q", "attn_v"), layers=range(30), std: float = 0.05,
                   shapes=SHAPES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{llama.cpp tensor name: (A rank x in, B out x rank)} with B @ A of about `std` per entry."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in layers:
        for k in kinds:
            o, n = shapes[k]
            out[f"blk.{i}.{k}.weight"] = (rng.normal(0, 1 / np.sqrt(n), (rank, n)), rng.normal(0, std, (o, rank)))
    return out


def strong_lora(path: Path, seed: int, rank: int = 4) -> Path:
    """An adapter on every attention and MLP matrix, large enough to change greedy output."""
    from dialogue.gguf.lora import write_lora
    return write_lora(path, "llama", random_factors(seed, rank, kinds=tuple(SHAPES), std=0.5))
