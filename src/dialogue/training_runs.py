"""The training runs this user started, for the surfaces that show them (the web's training page).

`dialogue train --out DIR` writes DIR/metrics.jsonl as it trains (train/loop.py) and records DIR
here when it starts, in `<data dir>/training-runs.json` (the newest first, at most `KEEP`), so a
run is listed while it trains. A run is read from its folder each time (its metrics and
train_config.json are data: numbers are parsed, anything else is skipped), so a folder moved or
deleted simply drops out of the list. Torch-free: the service reads it without the train extra.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainingRun", "record", "runs", "find", "records", "index_path", "KEEP"]

KEEP = 200
METRICS = "metrics.jsonl"


def index_path() -> Path:
    from .gguf.models import data_dir
    return data_dir() / "training-runs.json"


def _read_index() -> list[str]:
    try:
        got = json.loads(index_path().read_text("utf-8"))
    except (OSError, ValueError):
        return []
    return [p for p in got if isinstance(p, str)] if isinstance(got, list) else []


def record(out_dir: str | os.PathLike[str]) -> None:
    """Remember a run folder (newest first). Best effort: a run never fails for its listing."""
    path = str(Path(out_dir).expanduser().resolve())
    try:
        idx = index_path()
        idx.parent.mkdir(parents=True, exist_ok=True)
        paths = [path] + [p for p in _read_index() if p != path]
        fd, tmp = tempfile.mkstemp(dir=idx.parent, prefix=".training-runs.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(paths[:KEEP], f, indent=1)
        os.replace(tmp, idx)
    except OSError:
        pass


@dataclass(frozen=True)
class TrainingRun:
    id: str                 # stable for the folder: the page's address
    path: str
    name: str
    steps: int              # steps recorded so far
    total_steps: int | None
    first_loss: float | None
    last_loss: float | None
    updated: float          # the metrics file's last change
    config: dict[str, Any] = field(default_factory=dict)  # train_config.json (after the run), as numbers and words

    @property
    def finished(self) -> bool:
        return bool(self.config) or (self.total_steps is not None and self.steps >= self.total_steps)


def _id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:16]


def records(run: TrainingRun | str) -> list[dict[str, Any]]:
    """The run's metrics, as `charts.training_records` reads them (numbers only)."""
    from .charts import training_records
    folder = Path(run.path if isinstance(run, TrainingRun) else run)
    try:
        with open(folder / METRICS, encoding="utf-8", errors="replace") as f:
            return training_records(f)
    except OSError:
        return []


def _scalar(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, sort_keys=True)[:200]


def _load(path: str) -> TrainingRun | None:
    folder = Path(path)
    try:
        updated = (folder / METRICS).stat().st_mtime
    except OSError:
        return None
    recs = records(path)
    cfg: dict[str, Any] = {}
    try:
        raw = json.loads((folder / "train_config.json").read_text("utf-8"))
        if isinstance(raw, dict):
            cfg = {str(k): _scalar(v) for k, v in raw.items()}
    except (OSError, ValueError):
        pass
    total = cfg.get("steps") if isinstance(cfg.get("steps"), int) else None
    if total is None and recs and recs[-1].get("p"):
        total = round((recs[-1]["step"] - 1) / recs[-1]["p"]) or None
    return TrainingRun(_id(path), path, folder.name, len(recs), total,
                       recs[0]["loss"] if recs else None, recs[-1]["loss"] if recs else None, updated, cfg)


def runs() -> list[TrainingRun]:
    """The recorded runs whose folder still holds metrics, newest change first."""
    got = [r for r in (_load(p) for p in _read_index()) if r is not None]
    return sorted(got, key=lambda r: -r.updated)


def find(run_id: str) -> TrainingRun | None:
    for p in _read_index():
        if _id(p) == run_id:
            return _load(p)
    return None
