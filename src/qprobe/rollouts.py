"""The rollout store: samples, rewards and features on disk, appendable and crash-safe.

A rollouts folder (format `qprobe-rollouts/1`, documented in docs/rollouts.md):

    meta.json                 {"format", "feature_spec", "sampling", "task", "split", ...}
    samples-00000.parquet     one row per (prompt_id, sample_idx): prompt_id, sample_idx, prompt,
                              completion, reward (+ any extra columns)
    features-00000.npy        [rows, dim] float16/float32, row i <-> row i of samples-00000
    samples-00001.parquet ...
    pairs.parquet             optional, preference data: prompt_id, chosen, rejected (sample_idx)

Crash safety: a shard is written features first, then samples, each to a temporary name and
renamed into place. The samples file is the commit marker: a features file without its samples
file (a crash between the two renames) is deleted when the store is next opened for writing, so
a `kill -9` at any moment loses at most the shard in flight and never leaves a half shard.
Keys (prompt_id, sample_idx) are unique across the store; appending a stored key is refused.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec

FORMAT = "qprobe-rollouts/1"
REQUIRED_COLUMNS = ("prompt_id", "sample_idx", "prompt", "completion", "reward")
BASE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("reward", pa.float32()),
    ]
)
# Optional columns `qprobe collect` writes, with their types (other extra columns are inferred;
# a shard whose values are all null keeps the type).
COLUMN_TYPES = {"num_tokens": pa.int64(), "logprob_sum": pa.float32(), "token_ids": pa.list_(pa.int32())}
# meta keys that describe the run's progress, not its identity: they may change on resume.
NON_IDENTITY_KEYS = {"format", "feature_spec", "created", "updated", "progress", "summary"}
_SHARD_RE = re.compile(r"^samples-(\d{5,})\.parquet$")


def _shard_names(i: int) -> tuple[str, str]:
    return f"samples-{i:05d}.parquet", f"features-{i:05d}.npy"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, write) -> None:
    """Write via `write(file_obj)` to `path.tmp`, fsync, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    _atomic_write_bytes(path, lambda f: f.write(data))


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in NON_IDENTITY_KEYS and not k.startswith("_")}


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so that tuples vs lists etc. compare equal to what is stored."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _list_shards(path: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in path.iterdir() if (m := _SHARD_RE.match(p.name)))


def _rows_to_table(rows: Sequence[dict[str, Any]], where: str) -> pa.Table:
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise QProbeError(f"{where}: rows lack required column(s) {missing}")
    columns: dict[str, list[Any]] = {name: [] for name in rows[0]}
    for i, row in enumerate(rows):
        if row.keys() != columns.keys():
            raise QProbeError(f"{where}: row {i} has columns {sorted(row)}, expected {sorted(columns)}")
        for name, value in row.items():
            columns[name].append(value)
    arrays, fields = [], []
    for name, values in columns.items():
        typ = BASE_SCHEMA.field(name).type if name in BASE_SCHEMA.names else COLUMN_TYPES.get(name)
        try:
            arr = pa.array(values, type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise QProbeError(f"{where}: column {name!r}: {e}") from None
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class RolloutWriter:
    """Creates a rollouts folder or resumes one, appending one atomic shard per `append` call.

    `meta` identifies the run (model, task, split, k, sampling parameters, ...). Resuming a folder
    whose stored identity or feature spec differs is refused: mixing samples of two different
    runs would silently corrupt every statistic computed on them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: dict[str, Any] | None = None,
        feature_spec: FeatureSpec | None = None,
    ) -> None:
        self.path = Path(path)
        self.feature_spec = feature_spec
        meta = _jsonable(dict(meta or {}))
        if self.path.exists() and not self.path.is_dir():
            raise QProbeError(f"{self.path}: exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            stored = _read_meta(self.path)
            self._check_resume(stored, meta)
            self.meta = stored
        else:
            leftovers = [p.name for p in self.path.iterdir() if not p.name.endswith(".tmp")]
            if leftovers:
                raise QProbeError(
                    f"{self.path}: folder is not empty and has no meta.json "
                    f"(found {leftovers[0]!r}); refusing to write rollouts into it"
                )
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.meta = {
                **meta,
                "format": FORMAT,
                "feature_spec": feature_spec.to_dict() if feature_spec else None,
                "created": now,
            }
            _write_json(meta_path, self.meta)
            _fsync_dir(self.path)
        self._recover()
        self.done: set[tuple[str, int]] = set()
        for i in self._shards:
            t = pq.read_table(self.path / _shard_names(i)[0], columns=["prompt_id", "sample_idx"])
            self.done.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))

    def _check_resume(self, stored: dict[str, Any], meta: dict[str, Any]) -> None:
        where = f"{self.path}: cannot resume"
        stored_spec = stored.get("feature_spec")
        new_spec = self.feature_spec.to_dict() if self.feature_spec else None
        if stored_spec != new_spec:
            raise QProbeError(
                f"{where}: stored feature spec {stored_spec} differs from this run's {new_spec}"
            )
        old, new = _identity(stored), _identity(meta)
        diffs = [
            f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        if diffs:
            raise QProbeError(
                f"{where}: it was made with other settings ({'; '.join(diffs)}); "
                "use another --out folder or delete this one"
            )

    def _recover(self) -> None:
        """Remove what a crash can leave: temporary files and features without samples."""
        for p in self.path.glob("*.tmp"):
            p.unlink()
        self._shards = _list_shards(self.path)
        committed = {_shard_names(i)[1] for i in self._shards}
        for p in self.path.glob("features-*.npy"):
            if p.name not in committed:
                p.unlink()

    @property
    def num_rows(self) -> int:
        return len(self.done)

    def append(self, rows: Sequence[dict[str, Any]], features: np.ndarray | None = None) -> None:
        """Write `rows` (and their `features` [len(rows), dim]) as one new shard."""
        if not rows:
            return
        where = f"{self.path}: append"
        table = _rows_to_table(rows, where)
        keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))
        if len(set(keys)) != len(keys):
            raise QProbeError(f"{where}: duplicate (prompt_id, sample_idx) within the batch")
        dup = next((k for k in keys if k in self.done), None)
        if dup is not None:
            raise QProbeError(f"{where}: (prompt_id, sample_idx) = {dup} is already stored")
        spec = self.feature_spec
        if spec is not None:
            if features is None:
                raise QProbeError(f"{where}: this store has a feature spec, so features are required")
            features = np.asarray(features)
            if features.shape != (len(rows), spec.dim):
                raise QProbeError(
                    f"{where}: features have shape {features.shape}, expected ({len(rows)}, {spec.dim})"
                )
            if not np.isfinite(features).all():
                raise QProbeError(f"{where}: features contain NaN or inf")
            features = np.ascontiguousarray(features, dtype=spec.dtype)
        elif features is not None:
            raise QProbeError(f"{where}: this store has no feature spec, so it takes no features")

        index = (self._shards[-1] + 1) if self._shards else 0
        samples_name, features_name = _shard_names(index)
        if features is not None:
            _atomic_write_bytes(self.path / features_name, lambda f: np.save(f, features))
        _atomic_write_bytes(self.path / samples_name, lambda f: pq.write_table(table, f))
        _fsync_dir(self.path)
        self._shards.append(index)
        self.done.update(keys)

    def write_pairs(self, pairs: Sequence[dict[str, Any]]) -> None:
        """Write (or replace) pairs.parquet: prompt_id, chosen, rejected (sample_idx values)."""
        table = pa.table(
            {
                "prompt_id": pa.array([p["prompt_id"] for p in pairs], pa.string()),
                "chosen": pa.array([p["chosen"] for p in pairs], pa.int32()),
                "rejected": pa.array([p["rejected"] for p in pairs], pa.int32()),
            }
        )
        _atomic_write_bytes(self.path / "pairs.parquet", lambda f: pq.write_table(table, f))

    def update_meta(self, **info: Any) -> None:
        """Record non-identity information (e.g. "summary", "progress") in meta.json."""
        bad = [k for k in info if k not in NON_IDENTITY_KEYS and not k.startswith("_")]
        if bad:
            raise QProbeError(f"{self.path}: update_meta only takes progress keys, not {bad}")
        self.meta.update(_jsonable(info))
        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_json(self.path / "meta.json", self.meta)

    def __enter__(self) -> RolloutWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise QProbeError(f"{path}: not a rollouts folder (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QProbeError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise QProbeError(f"{meta_path}: format is {got!r}, expected {FORMAT!r}")
    return meta


class Rollouts:
    """Reads and validates a rollouts folder; features are memory-mapped.

    Construction checks the whole folder and raises QProbeError with one line naming the file on:
    a missing or foreign meta.json, missing required columns, a features shard whose row count or
    dimension disagrees with its samples shard or the feature spec, and NaN/inf features.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._load()

    def _load(self) -> None:
        if not self.path.is_dir():
            raise QProbeError(f"{self.path}: rollouts folder not found")
        self.meta = _read_meta(self.path)
        spec = self.meta.get("feature_spec")
        self.feature_spec = (
            FeatureSpec.from_dict(spec, where=f"{self.path / 'meta.json'}: feature_spec") if spec else None
        )
        self._shards = _list_shards(self.path)
        if not self._shards:
            raise QProbeError(f"{self.path}: rollouts folder has no samples-*.parquet shards")
        tables, feats = [], []
        for i in self._shards:
            samples_name, features_name = _shard_names(i)
            where = self.path / samples_name
            try:
                t = pq.read_table(where)
            except (pa.ArrowException, OSError) as e:
                raise QProbeError(f"{where}: unreadable parquet ({e})") from None
            missing = [c for c in REQUIRED_COLUMNS if c not in t.column_names]
            if missing:
                raise QProbeError(f"{where}: missing required column(s) {missing}")
            tables.append(t)
            if self.feature_spec is not None:
                feats.append(self._load_features(self.path / features_name, t.num_rows))
        try:
            self.table: pa.Table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise QProbeError(f"{self.path}: shards have incompatible columns ({e})") from None
        self._feature_shards = feats
        self._features: np.ndarray | None = None
        keys = set(zip(self.table.column("prompt_id").to_pylist(), self.table.column("sample_idx").to_pylist()))
        if len(keys) != self.table.num_rows:
            raise QProbeError(f"{self.path}: duplicate (prompt_id, sample_idx) rows")

    def _load_features(self, path: Path, rows: int) -> np.ndarray:
        spec = self.feature_spec
        assert spec is not None
        if not path.is_file():
            raise QProbeError(f"{path}: missing (its samples shard has {rows} rows)")
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise QProbeError(f"{path}: unreadable .npy ({e})") from None
        if arr.ndim != 2 or arr.shape[0] != rows:
            raise QProbeError(f"{path}: has shape {arr.shape}, but its samples shard has {rows} rows")
        if arr.shape[1] != spec.dim:
            raise QProbeError(f"{path}: feature dim {arr.shape[1]} != feature_spec dim {spec.dim}")
        if arr.dtype not in (np.float16, np.float32):
            raise QProbeError(f"{path}: dtype {arr.dtype}, expected float16 or float32")
        for start in range(0, rows, 8192):
            block = arr[start : start + 8192]
            if not np.isfinite(block).all():
                bad = start + int(np.argwhere(~np.isfinite(block).all(axis=1))[0, 0])
                raise QProbeError(f"{path}: row {bad} has NaN or inf features")
        return arr

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list[Any]:
        if name not in self.table.column_names:
            raise QProbeError(f"{self.path}: no column {name!r} (have {self.table.column_names})")
        return self.table.column(name).to_pylist()

    @property
    def prompt_ids(self) -> np.ndarray:  # [N] str
        return np.asarray(self.column("prompt_id"), dtype=object).astype(str)

    @property
    def sample_idx(self) -> np.ndarray:  # [N] int32
        return self.table.column("sample_idx").to_numpy().astype(np.int32)

    @property
    def rewards(self) -> np.ndarray:  # [N] float32, NaN where not scored
        col = self.table.column("reward").cast(pa.float32())
        return col.to_numpy(zero_copy_only=False).astype(np.float32)

    @property
    def features(self) -> np.ndarray:  # [N, D], memory-mapped when there is one shard
        if self.feature_spec is None:
            raise QProbeError(f"{self.path}: this rollouts folder has no features (no feature_spec)")
        if self._features is None:
            shards = self._feature_shards
            self._features = shards[0] if len(shards) == 1 else np.concatenate(shards)
        return self._features

    def groups(self) -> tuple[np.ndarray, list[str]]:
        """(group [N] int64 index into prompts, prompts: unique prompt ids in first-seen order)."""
        index: dict[str, int] = {}
        group = np.fromiter(
            (index.setdefault(p, len(index)) for p in self.column("prompt_id")),
            dtype=np.int64,
            count=len(self),
        )
        return group, list(index)

    @property
    def pairs(self) -> pa.Table | None:
        path = self.path / "pairs.parquet"
        if not path.is_file():
            return None
        t = pq.read_table(path)
        missing = [c for c in ("prompt_id", "chosen", "rejected") if c not in t.column_names]
        if missing:
            raise QProbeError(f"{path}: missing required column(s) {missing}")
        return t

    def set_rewards(
        self,
        rewards: Sequence[float | None],
        extra_columns: dict[str, Sequence[Any]] | None = None,
    ) -> None:
        """Replace the reward column (and add/replace `extra_columns`), shard by shard.

        All new shard files are written under temporary names first, then renamed into place, so
        a failure while writing leaves the old rewards intact.
        """
        n = len(self)
        columns = {"reward": pa.array(list(rewards), pa.float32())}
        for name, values in (extra_columns or {}).items():
            if name in ("prompt_id", "sample_idx", "prompt", "completion"):
                raise QProbeError(f"set_rewards: column {name!r} is not a reward column")
            columns[name] = pa.array(list(values))
        for name, arr in columns.items():
            if len(arr) != n:
                raise QProbeError(f"{self.path}: set_rewards got {len(arr)} values for {name!r}, store has {n} rows")
        staged, offset = [], 0
        for i in self._shards:
            path = self.path / _shard_names(i)[0]
            t = pq.read_table(path)
            for name, arr in columns.items():
                part = arr.slice(offset, t.num_rows)
                if name in t.column_names:
                    t = t.set_column(t.column_names.index(name), name, part)
                else:
                    t = t.append_column(name, part)
            offset += t.num_rows
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(t, tmp)
            staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
        _fsync_dir(self.path)
        self._load()


def write_rollouts(
    path: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    features: np.ndarray | None = None,
    *,
    meta: dict[str, Any] | None = None,
    feature_spec: FeatureSpec | None = None,
    pairs: Sequence[dict[str, Any]] | None = None,
) -> Rollouts:
    """Write a complete rollouts folder in one call (e.g. samples made elsewhere) and open it."""
    w = RolloutWriter(path, meta=meta, feature_spec=feature_spec)
    w.append(rows, features)
    if pairs is not None:
        w.write_pairs(pairs)
    return Rollouts(path)
