"""Merging LoRA adapters into a new LoRA adapter (never into a model): linear, TIES, DARE.

Weights are per parent; each parent's delta is `alpha/r * B @ A` per target tensor:
- linear: `sum_i w_i * delta_i`, re-factorized exactly from the stacked factors (QR of the
  stacked B and A, SVD of the small core): at rank = sum of the parents' ranks it reproduces the
  weighted sum to float precision; lower ranks keep the best approximation (Eckart-Young).
- ties (Yadav et al. 2023): each weighted delta trimmed to its `density` largest magnitudes, a sign
  elected per entry from the sum, and the entries that agree with it averaged (weighted by w_i);
  then truncated SVD to `rank`.
- dare (Yu et al. 2023): each delta's entries dropped with probability 1 - `density` (seeded),
  survivors rescaled by 1/density, weighted sum; then truncated SVD to `rank`.

This module works on files (`merge_files`); registering the result is `adapters.merge`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..gguf.lora import (TOKEN_EMBD, AdapterError, AdapterMismatchError, LoraFile, check_scale, load_factors,
                         write_lora)
from ..gguf.models import model_hash
from ..progress import OnProgress, Steps

__all__ = ["MERGE_METHODS", "merge_files"]

MERGE_METHODS = ("linear", "ties", "dare")


def _exact_lowrank(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k factors of sum_i B_i A_i without forming the dense matrix: with
    B = [B_1 .. B_n] = Qb Rb and A^T = [A_1; ..; A_n]^T = Qa Ra, the sum is Qb (Rb Ra^T) Qa^T, and
    the SVD of the small core gives the singular vectors. Exact at k = sum of ranks."""
    B = np.concatenate(Bs, axis=1)
    A = np.concatenate(As, axis=0)
    Qb, Rb = np.linalg.qr(B)
    Qa, Ra = np.linalg.qr(A.T)
    U, S, Vt = np.linalg.svd(Rb @ Ra.T)
    k = min(k, len(S))
    sq = np.sqrt(S[:k])
    return (Qb @ U[:, :k]) * sq, (sq[:, None] * Vt[:k]) @ Qa.T


def _truncated_svd(M: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rank-k factors (B, A) of a dense matrix. Randomized range finder with power iterations
    (Halko, Martinsson & Tropp 2011) for large matrices: numpy has no truncated SVD, scipy is not a
    dependency, and the exact SVD of every delta of even a 135M model took about a minute here."""
    m, n = M.shape
    k = min(k, m, n)
    if min(m, n) <= 4 * k + 32:
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
    else:
        p = min(min(m, n), 2 * k + 16)
        Y = M @ rng.standard_normal((n, p))
        for _ in range(2):  # power iterations sharpen the spectrum; QR keeps them stable
            Q, _ = np.linalg.qr(Y)
            Z, _ = np.linalg.qr(M.T @ Q)
            Y = M @ Z
        Q, _ = np.linalg.qr(Y)
        Ub, S, Vt = np.linalg.svd(Q.T @ M, full_matrices=False)
        U = Q @ Ub
    sq = np.sqrt(S[:k])
    return U[:, :k] * sq, sq[:, None] * Vt[:k]


class _one_blas_thread:
    """Run numpy's BLAS/LAPACK on one thread while merging. The merge makes thousands of small
    QR/SVD calls; OpenBLAS's thread pool spinning at each of them, next to torch's OpenMP pool or
    other busy processes, was measured 3-60x slower here than one thread. threadpoolctl is the
    maintained way to set that at run time; without it the merge is merely slower."""

    def __enter__(self) -> "_one_blas_thread":
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self._ctl = None
        else:
            self._ctl = threadpool_limits(1, user_api="blas")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctl is not None:
            self._ctl.restore_original_limits()


def _pad(B: np.ndarray, A: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad factors to rank k, so the whole adapter has one rank (alpha = rank means scale 1)."""
    r = B.shape[1]
    if r == k:
        return B, A
    return (np.concatenate([B, np.zeros((B.shape[0], k - r))], axis=1),
            np.concatenate([A, np.zeros((k - r, A.shape[1]))], axis=0))


def _merge_tensors(loaded: Sequence[tuple[LoraFile, dict[str, tuple[np.ndarray, np.ndarray]]]],
                   w: Sequence[float], shapes: Mapping[str, tuple[int, int]], method: str, k: int, dens: float,
                   rng: np.random.Generator, svd_rng: np.random.Generator,
                   on_progress: OnProgress | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per base tensor: the parents' weighted deltas combined by `method`, as rank-k (A, B)."""
    merged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    steps = Steps(on_progress, f"merging adapters ({method})", total=len(shapes), unit="tensors")
    for n in sorted(shapes):
        present = [(wi, fac[n]) for wi, (_, fac) in zip(w, loaded) if n in fac]
        if method == "linear":
            B, A = _exact_lowrank([wi * B for wi, (A, B) in present], [A for _, (A, B) in present], k)
        else:
            deltas = np.stack([wi * (B @ A) for wi, (A, B) in present])  # weighted task vectors
            if method == "ties":
                flat = np.abs(deltas).reshape(len(present), -1)
                keep = max(1, int(round(dens * flat.shape[1])))
                thr = np.partition(flat, flat.shape[1] - keep, axis=1)[:, flat.shape[1] - keep]
                deltas = np.where(np.abs(deltas) >= thr[:, None, None], deltas, 0.0)
                sign = np.sign(deltas.sum(axis=0))
                agree = (np.sign(deltas) == sign) & (deltas != 0)
                wts = np.array([wi for wi, _ in present])[:, None, None] * agree
                denom = wts.sum(axis=0)
                # each delta already carries its weight: the weighted mean of the agreeing deltas
                # w_i*d_i over the sum of their weights
                dense = np.where(denom != 0, (deltas * agree).sum(axis=0) / np.where(denom == 0, 1, denom), 0.0)
            else:  # dare
                masks = rng.random(deltas.shape) < dens
                dense = (deltas * masks).sum(axis=0) / dens
            B, A = _truncated_svd(dense, k, svd_rng)
        B, A = _pad(B, A, k)
        merged[n] = (A, B)
        steps.advance()
    steps.finish()
    return merged


def merge_files(parents: Sequence[str | os.PathLike[str]], weights: Sequence[float], out: str | os.PathLike[str],
                *, method: str = "linear", rank: int | None = None, density: float | None = None,
                seed: int = 0, dtype: str = "f16", meta: Mapping[str, Any] | None = None,
                on_progress: OnProgress | None = None) -> Path:
    """Merge GGUF LoRA adapters into a new GGUF LoRA adapter at `out` (see the module docstring for
    the methods). `rank` defaults to the sum of the parents' ranks for linear (exact) and their
    largest rank for ties/dare; `density` (fraction kept) defaults to 0.5. Parents must adapt the
    same architecture with the same tensor shapes; a tensor only some parents adapt counts as
    zero in the others. `on_progress` hears the tensors merged (one SVD each for ties/dare)."""
    if method not in MERGE_METHODS:
        raise AdapterError(f"unknown merge method {method!r}: use one of {', '.join(MERGE_METHODS)}")
    if len(parents) < 1:
        raise AdapterError("merge needs at least one parent adapter")
    if len(weights) != len(parents):
        raise AdapterError(f"{len(parents)} adapters but {len(weights)} weights: give one weight per adapter")
    w = [check_scale(str(p), x) for p, x in zip(parents, weights)]
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if density is not None and not (0.0 < density <= 1.0):
        raise AdapterError(f"density must be in (0, 1], got {density!r}")
    if method == "linear" and density is not None:
        raise AdapterError("density applies to ties and dare only")
    dens = 0.5 if density is None else float(density)
    loaded = [load_factors(p) for p in parents]
    arch = loaded[0][0].architecture
    shapes: dict[str, tuple[int, int]] = {}
    for lora, fac in loaded:
        if lora.architecture != arch:
            raise AdapterMismatchError(f"cannot merge a {lora.architecture!r} adapter ({lora.path.name}) with a "
                                       f"{arch!r} one ({loaded[0][0].path.name})")
        for n, (A, B) in fac.items():
            if n == TOKEN_EMBD:
                raise AdapterError(f"{lora.path.name} adapts the token embeddings, which llama.cpp applies "
                                   "transposed; merging such adapters is not supported")
            s = (B.shape[0], A.shape[1])
            if shapes.setdefault(n, s) != s:
                raise AdapterMismatchError(f"cannot merge: tensor {n!r} is {shapes[n]} (out, in) in one parent "
                                           f"and {s} in {lora.path.name}: the parents are for different bases")
    parent_ranks = [max(lora.ranks) for lora, _ in loaded]
    k = rank or (sum(parent_ranks) if method == "linear" else max(parent_ranks))
    rng = np.random.default_rng(seed)
    svd_rng = np.random.default_rng([seed, 1])
    with _one_blas_thread():
        merged = _merge_tensors(loaded, w, shapes, method, k, dens, rng, svd_rng, on_progress)
    info_meta = {"method": method, "rank": k, "weights": w, "seed": seed if method == "dare" else None,
                 "density": dens if method != "linear" else None,
                 "parents": [{"file": lora.path.name, "hash": model_hash(lora.path)[:16]} for lora, _ in loaded]}
    m = {"dialogue.merge": info_meta, "dialogue.rank": k}
    bases = {lora.meta.get("dialogue.base") for lora, _ in loaded} - {None}
    if len(bases) == 1:
        m["dialogue.base"] = bases.pop()
    m.update(meta or {})
    return write_lora(out, arch, merged, alpha=None, meta=m, dtype=dtype, on_progress=on_progress)

