"""The model registry: checkpoints as files, their records as a Parquet table.

``<data root>/models/<model_id>/model.pt`` holds the weights, the architecture and the
input normaliser; ``metadata.json`` beside it, and one row per model in
``<data root>/models/models.parquet`` (the ``models`` view of the DuckDB catalog) say
what it was trained on, how it scored, on which device and how long it took. The
``input_hash`` of a record fingerprints everything training depends on (the training
files' bytes, the labels, the configuration and the code version), so an unchanged
input finds its model instead of training again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ml.features import Normalizer
from ml.models import UnetSpec, build_unet
from pipelines.storage import atomic_dir, atomic_path

MODELS_DIR = "models"
TABLE = "models.parquet"
#: Bumped when training code changes what a given input produces.
TRAINING_VERSION = "2"  # 2: decision threshold chosen on validation data


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    created_at: str
    kind: str
    input_hash: str
    path: str
    device: str
    seconds: float
    train_data: list[dict[str, str]]
    metrics: dict[str, Any]
    config: dict[str, Any]

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("train_data", "metrics", "config"):
            d[k] = json.dumps(d[k], sort_keys=True)
        return d


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_hash(files: Iterable[Path], config: dict[str, Any]) -> str:
    """Fingerprint of the training inputs: file contents, configuration, code version."""
    h = hashlib.sha256(TRAINING_VERSION.encode())
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()[:16]


def models_dir(root: Path) -> Path:
    return root / MODELS_DIR


def records(root: Path) -> list[ModelRecord]:
    table = models_dir(root) / TABLE
    if not table.exists():
        return []
    out = []
    for row in pq.read_table(table).to_pylist():
        for k in ("train_data", "metrics", "config"):
            row[k] = json.loads(row[k])
        out.append(ModelRecord(**row))
    return out


def find(root: Path, input_hash_: str) -> ModelRecord | None:
    """The newest registered model trained on exactly these inputs, if its file is there."""
    hits = [r for r in records(root) if r.input_hash == input_hash_ and Path(r.path).exists()]
    return max(hits, key=lambda r: r.created_at) if hits else None


def latest(root: Path, kind: str = "unet") -> ModelRecord | None:
    hits = [r for r in records(root) if r.kind == kind and Path(r.path).exists()]
    return max(hits, key=lambda r: r.created_at) if hits else None


def register(
    root: Path,
    model: nn.Module,
    spec: UnetSpec,
    normalizer: Normalizer,
    *,
    input_hash_: str,
    device: str,
    seconds: float,
    train_data: list[dict[str, str]],
    metrics: dict[str, Any],
    config: dict[str, Any],
) -> ModelRecord:
    """Store the checkpoint and its record; the table is rewritten atomically."""
    created = dt.datetime.now(dt.UTC)
    model_id = f"unet-{created:%Y%m%dT%H%M%S}-{input_hash_[:8]}"
    target = models_dir(root) / model_id
    record = ModelRecord(
        model_id=model_id,
        created_at=created.isoformat(timespec="seconds"),
        kind="unet",
        input_hash=input_hash_,
        path=str(target / "model.pt"),
        device=device,
        seconds=round(seconds, 2),
        train_data=train_data,
        metrics=metrics,
        config=config,
    )
    with atomic_dir(target) as tmp:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(
            {"state_dict": state, "spec": spec.to_dict(), "normalizer": asdict(normalizer)},
            tmp / "model.pt",
        )
        (tmp / "metadata.json").write_text(json.dumps(asdict(record), indent=2) + "\n")
    rows = [r.row() for r in records(root) if r.model_id != model_id] + [record.row()]
    with atomic_path(models_dir(root) / TABLE) as tmp_table:
        pq.write_table(pa.Table.from_pylist(rows), tmp_table)
    return record


def load(record: ModelRecord | str | Path) -> tuple[nn.Module, Normalizer, UnetSpec]:
    """Rebuild a registered model (weights, architecture, normaliser) on the CPU."""
    path = Path(record.path if isinstance(record, ModelRecord) else record)
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    spec = UnetSpec.from_dict(ckpt["spec"])
    model = build_unet(spec)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    norm = Normalizer(tuple(ckpt["normalizer"]["mean"]), tuple(ckpt["normalizer"]["std"]))
    return model, norm, spec
