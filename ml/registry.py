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

import contextlib
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ml.features import Normalizer
from ml.models import UnetSpec, build_unet
from pipelines.infra.errors import first_line
from pipelines.infra.layout import MODELS_DIR
from pipelines.infra.storage import atomic_dir, atomic_path

log = logging.getLogger(__name__)

TABLE = "models.parquet"
JSON_FIELDS = ("train_data", "metrics", "config", "domain")
DOMAIN_KEYS = ("imagery", "regions", "sources", "countries", "periods", "bands")
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
    #: What the model was trained on (``DOMAIN_KEYS``): ``imagery`` is ``embedded`` (the
    #: simulator's scenes only), ``real`` or ``mixed``; ``unknown`` for a model registered
    #: before domains were recorded. The regions, their sources and countries, the
    #: periods and the input bands.
    domain: dict[str, Any] = field(default_factory=dict)

    @property
    def imagery(self) -> str:
        return str(self.domain.get("imagery", "unknown"))

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        for k in JSON_FIELDS:
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


class RegistryError(RuntimeError):
    """The registry or a registered checkpoint cannot be used; the message says what to do."""


RETRAIN_HINT = (
    "restore models/ from a backup, or retrain: materialise `mining_model` with the "
    "resource torch_device.retrain=true (Launchpad), or delete the model's folder and "
    "its row will go with `asmwatch doctor --fix`"
)


def checkpoint_file(root: Path, record: ModelRecord) -> Path:
    """Where ``record``'s checkpoint is under ``root`` (from its id, wherever the root is)."""
    return models_dir(root) / record.model_id / "model.pt"


def checkpoint_problem(root: Path, record: ModelRecord) -> str | None:
    """Why the registered checkpoint of ``record`` cannot be used, or None."""
    path = checkpoint_file(root, record)
    if not path.exists():
        return f"model {record.model_id} is registered but its checkpoint {path} is missing"
    try:
        if record.kind == "chips":
            load_chip_model(root, record)
        else:
            load(root, record)
    except RegistryError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Registry writers take turns (``models/.registry.lock``, flock across processes)."""
    import fcntl

    d = models_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".registry.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _from_row(row: dict[str, Any]) -> ModelRecord:
    if row.get("domain") is None:  # registered before domains were recorded
        row["domain"] = legacy_domain(row)
    for k in JSON_FIELDS:
        if isinstance(row[k], str):
            row[k] = json.loads(row[k])
    return ModelRecord(**{f: row[f] for f in ModelRecord.__dataclass_fields__})


def legacy_domain(row: dict[str, Any]) -> dict[str, Any]:
    """The domain of a model registered before domains were recorded: its regions and
    periods from ``train_data``, its imagery ``unknown`` (never used for a real region
    by ``auto``)."""
    data = row.get("train_data") or []
    if isinstance(data, str):
        data = json.loads(data)
    return {
        "imagery": "unknown",
        "regions": sorted({d["region"] for d in data if "region" in d}),
        "sources": [], "countries": [],
        "periods": sorted({f"{d['region']}/{d['period']}" for d in data if "region" in d}),
        "bands": [],
    }  # fmt: skip


def _scan(root: Path) -> list[ModelRecord]:
    """The records that the model folders' ``metadata.json`` files hold."""
    out = []
    for meta in sorted(models_dir(root).glob("*/metadata.json")):
        try:
            out.append(_from_row(json.loads(meta.read_text(encoding="utf-8"))))
        except (ValueError, KeyError, TypeError) as e:
            raise RegistryError(f"{meta} is damaged ({e}); {RETRAIN_HINT}") from e
    return out


def _age(r: ModelRecord) -> tuple[dt.datetime, str]:
    """Registration order: ``created_at`` as a time (to the microsecond; older records
    have whole seconds), then the id."""
    return dt.datetime.fromisoformat(r.created_at), r.model_id


def _write_table(root: Path, recs: list[ModelRecord]) -> None:
    rows = [r.row() for r in sorted(recs, key=_age)]
    with atomic_path(models_dir(root) / TABLE) as tmp_table:
        pq.write_table(pa.Table.from_pylist(rows), tmp_table)


def rebuild(root: Path) -> list[ModelRecord]:
    """Rewrite ``models.parquet`` from the model folders' ``metadata.json`` files."""
    with _lock(root):
        recs = _scan(root)
        if recs:
            _write_table(root, recs)
        else:
            (models_dir(root) / TABLE).unlink(missing_ok=True)
    return recs


def records(root: Path, say: Callable[[str], None] | None = None) -> list[ModelRecord]:
    """Every registered model. A damaged or missing ``models.parquet`` beside model
    folders is rebuilt from their ``metadata.json`` (``say`` gets a line saying so)."""
    table = models_dir(root) / TABLE
    warn = say or log.warning
    if not table.exists():
        if not any(models_dir(root).glob("*/metadata.json")):
            return []
        warn(f"model registry {table} is missing; rebuilding it from models/*/metadata.json")
        return rebuild(root)
    try:
        rows = pq.read_table(table).to_pylist()
        return [_from_row(row) for row in rows]
    except Exception as e:  # pyarrow raises several types on a damaged file
        warn(f"model registry {table} is damaged ({first_line(e)}); rebuilding it from models/*/metadata.json")  # fmt: skip
        return rebuild(root)


def find(root: Path, input_hash_: str) -> ModelRecord | None:
    """The newest registered model trained on exactly these inputs, if its file is there."""
    hits = [
        r for r in records(root)
        if r.input_hash == input_hash_ and checkpoint_file(root, r).exists()
    ]  # fmt: skip
    return max(hits, key=_age) if hits else None


def newest(recs: Iterable[ModelRecord]) -> ModelRecord:
    """The last registered of ``recs`` (not empty)."""
    return max(recs, key=_age)


def latest(root: Path, kind: str = "unet") -> ModelRecord | None:
    """The newest registered model of ``kind``, whether or not its file is there
    (``load`` then fails naming the file: never a silent fall back to another model)."""
    hits = [r for r in records(root) if r.kind == kind]
    return max(hits, key=_age) if hits else None


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
    domain: dict[str, Any] | None = None,
) -> ModelRecord:
    """Store a U-Net's checkpoint and its record, under the registry lock. ``domain``:
    what the model was trained on (``ModelRecord.domain``).

    Concurrent registrations (several runs, several processes) each get their own model
    id and row; the table is rewritten atomically from the model folders' metadata.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "spec": spec.to_dict(), "normalizer": asdict(normalizer)}
    return _register(
        root, "unet", payload, input_hash_=input_hash_, device=device, seconds=seconds,
        train_data=train_data, metrics=metrics, config=config,
        domain=dict(domain) if domain is not None else legacy_domain({"train_data": train_data}),
    )  # fmt: skip


def register_chip_model(root: Path, model: nn.Module, *, seeds: int, **record: Any) -> ModelRecord:
    """Store the screening detector (``ml.chips.Ensemble`` of ``seeds`` ChipNets, kind
    ``chips``); ``record``: the keyword arguments of ``register`` (``domain`` required),
    with ``config["rendering"]`` saying how composites become its input."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"state_dict": state, "arch": "chipnet-ensemble", "members": seeds}
    trees = getattr(model, "trees", None)
    if isinstance(trees, str):  # ml.chips.Hybrid: the trees travel as LightGBM's text
        payload.update(arch="chipnet-trees", trees=trees)
    return _register(root, "chips", payload, **record)


def _register(
    root: Path,
    kind: str,
    payload: dict[str, Any],
    *,
    input_hash_: str,
    device: str,
    seconds: float,
    train_data: list[dict[str, str]],
    metrics: dict[str, Any],
    config: dict[str, Any],
    domain: dict[str, Any],
) -> ModelRecord:
    with _lock(root):
        # Microseconds, and later than any record: two models registered within one
        # second must not tie, or ``latest`` would pick one of them by its hash.
        created = dt.datetime.now(dt.UTC)
        newest = max((_age(r)[0] for r in records(root)), default=None)
        if newest is not None and created <= newest:
            created = newest + dt.timedelta(microseconds=1)
        base = f"{kind}-{created:%Y%m%dT%H%M%S}-{input_hash_[:8]}"
        model_id, n = base, 1
        while (models_dir(root) / model_id).exists():
            n += 1
            model_id = f"{base}-{n}"
        target = models_dir(root) / model_id
        record = ModelRecord(
            model_id=model_id,
            created_at=created.isoformat(timespec="microseconds"),
            kind=kind,
            input_hash=input_hash_,
            path=f"{MODELS_DIR}/{model_id}/model.pt",  # relative to the data root
            device=device,
            seconds=round(seconds, 2),
            train_data=train_data,
            metrics=metrics,
            config=config,
            domain=domain,
        )
        with atomic_dir(target) as tmp:
            torch.save(payload, tmp / "model.pt")
            (tmp / "metadata.json").write_text(json.dumps(asdict(record), indent=2) + "\n")
        # The table is the model folders' records: every model on disk, this one too.
        _write_table(root, _scan(root))
    return record


def _checkpoint(root: Path, record: ModelRecord | str | Path) -> tuple[Path, str, dict[str, Any]]:
    """The checkpoint's path, a name for messages, and its content (weights only)."""
    if isinstance(record, ModelRecord):
        path, what = checkpoint_file(root, record), f"model {record.model_id}"
    else:
        path, what = Path(record), "model"
    if not path.exists():
        raise RegistryError(f"{what} is registered but its checkpoint {path} is missing; {RETRAIN_HINT}")  # fmt: skip
    try:
        return path, what, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _damaged(path, what, e) from None


def _damaged(path: Path, what: str, e: Exception) -> RegistryError:
    # torch's advice to load with weights_only=False (running code from the file) is
    # never passed on: the error's type says enough then.
    reason = type(e).__name__ if "weights_only" in str(e) else first_line(e)
    return RegistryError(
        f"the checkpoint of {what}, {path}, is damaged and cannot be loaded "
        f"({reason[:200]}); {RETRAIN_HINT}"
    )


def load_chip_model(root: Path, record: ModelRecord) -> nn.Module:
    """Rebuild a registered screening detector (kind ``chips``: an ``ml.chips.Ensemble``
    of ChipNets, or a ``Hybrid`` of them and gradient-boosted trees) on the CPU."""
    from ml.chips import Ensemble, Hybrid

    path, what, ckpt = _checkpoint(root, record)
    try:
        arch = ckpt.get("arch")
        model: nn.Module
        if arch == "chipnet-ensemble":
            model = Ensemble(int(ckpt["members"]))
        elif arch == "chipnet-trees":
            state = ckpt["state_dict"]
            model = Hybrid(int(ckpt["members"]), str(ckpt["trees"]), state["vote"])
        else:
            raise ValueError(f"not a chip model (arch {arch!r})")
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise _damaged(path, what, e) from None
    model.eval()
    return model


def load(root: Path, record: ModelRecord | str | Path) -> tuple[nn.Module, Normalizer, UnetSpec]:
    """Rebuild a registered U-Net (weights, architecture, normaliser) on the CPU.

    ``record``: a registry record (its checkpoint under ``root``) or a checkpoint path.
    A missing or damaged file raises ``RegistryError`` naming it and how to restore or
    retrain; torch's own advice (to load with ``weights_only=False``, which would run
    code from the file) is never passed on.
    """
    path, what, ckpt = _checkpoint(root, record)
    try:
        spec = UnetSpec.from_dict(ckpt["spec"])
        model = build_unet(spec)
        model.load_state_dict(ckpt["state_dict"])
        norm = Normalizer(tuple(ckpt["normalizer"]["mean"]), tuple(ckpt["normalizer"]["std"]))
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, KeyError, ...
        raise _damaged(path, what, e) from None
    model.eval()
    return model, norm, spec
