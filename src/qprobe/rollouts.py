"""The rollout store: samples, rewards and features on disk, appendable and crash-safe.

A rollouts folder (format `qprobe-rollouts/1`, documented in docs/rollouts.md):

    meta.json                 {"format", "feature_spec", "sampling", "task", "split", ...}
    samples-00000.parquet     one row per (prompt_id, sample_idx): prompt_id, sample_idx, prompt,
                              completion, reward (+ any extra columns)
    features-00000.npy        [rows, dim] float16/float32, row i <-> row i of samples-00000
    samples-00001.parquet ...
    pairs.parquet             optional, preference data: prompt_id, chosen, rejected (sample_idx)
    embedded/                 optional, from `qprobe embed`: more feature sets, log-likelihoods

Crash safety: a shard is written features first, then samples, each complete under a temporary
name and then linked into place. The samples file is the commit marker: a features file without
its samples file (a crash between the two) is deleted when the store is next opened for writing,
so a `kill -9` at any moment loses at most the shard in flight and never leaves a half shard.

Several writers (processes, or machines sharing the folder) may append at once: appends take the
folder's lock (`.lock`, flock), re-read the set of stored keys from disk, and claim the next shard
number with a no-clobber link, so no two writers take one name and no key is stored twice. Keys
(prompt_id, sample_idx) are unique across the store; appending a stored key is refused, or
skipped with `skip_stored=True`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec
from qprobe.fileio import atomic_write, atomic_write_json, claim_new, fsync_dir

FORMAT = "qprobe-rollouts/1"
EMBED_DIR = "embedded"  # what `qprobe embed` adds: named feature sets and log-likelihoods
REVIEW_FILE = "reviewer-{}.parquet"  # in EMBED_DIR: `qprobe review`'s scores of one shard
REVIEW_META = "reviewer.json"  # in EMBED_DIR: its model, prompt format and cost per shard
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
COLUMN_TYPES = {"num_tokens": pa.int64(), "logprob_sum": pa.float32(), "token_ids": pa.list_(pa.int32()),
                "visible_reward": pa.float32()}
# the execution signals' columns (`qprobe signals`, qprobe/verifier; null = not computed yet)
COLUMN_TYPES.update({"visible_status": pa.string(), "exec_sig": pa.string(),
                     "gen_passed": pa.list_(pa.int32()), "gen_tests": pa.int32(),
                     "gen_sig": pa.string(), "fuzz_sig": pa.string()})
# meta keys that describe the run's progress, not its identity: they may change on resume.
NON_IDENTITY_KEYS = {"format", "feature_spec", "created", "updated", "progress", "summary"}
STALE_SECONDS = 600  # without a lock, leftovers older than this are a crashed writer's
_SHARD_RE = re.compile(r"^samples-(\d{5,})\.parquet$")


def _shard_names(i: int) -> tuple[str, str]:
    return f"samples-{_shard_id(i)}.parquet", f"features-{_shard_id(i)}.npy"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in NON_IDENTITY_KEYS and not k.startswith("_")}


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so that tuples vs lists etc. compare equal to what is stored."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _list_shards(path: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in path.iterdir() if (m := _SHARD_RE.match(p.name)))


def _shard_id(i: int) -> str:
    return f"{i:05d}"


def shard_ids(path: str | os.PathLike[str]) -> list[str]:
    """The committed shards of a rollouts folder, in reading order (`samples-<id>.parquet`)."""
    return [_shard_id(i) for i in _list_shards(Path(path))]


def feature_set_name(spec: FeatureSpec) -> str:
    """`L{layer}-{position}`: how feature sets are named (qprobe embed, probes, --cv tables)."""
    return f"L{int(spec.layer)}-{spec.position}"


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
            stored = read_meta(self.path)
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
            fsync_dir(self.path)
        self._done: set[tuple[str, int]] = set()
        self._read: set[int] = set()  # shards whose keys are in self._done
        with self._locked() as exclusive:
            self._recover(exclusive)
            self._refresh()

    @property
    def done(self) -> set[tuple[str, int]]:
        """Keys stored so far, by any writer (re-read from disk on each access)."""
        self._refresh()
        return self._done

    def _refresh(self) -> None:
        """Add the keys of shards committed since the last look (by this or another writer)."""
        self._shards = _list_shards(self.path)
        for i in self._shards:
            if i not in self._read:
                t = pq.read_table(self.path / _shard_names(i)[0], columns=["prompt_id", "sample_idx"])
                self._done.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
                self._read.add(i)

    @contextmanager
    def _locked(self) -> Iterator[bool]:
        """Hold the folder's writer lock (`.lock`, flock); yields False where flock is unavailable.

        Appends and crash recovery run under it, so two writers never take the same shard number,
        never both store a key, and recovery never deletes another writer's shard in flight."""
        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:  # e.g. a file system without flock: fall back to no-clobber names
                locked = False
            yield locked
        finally:
            os.close(fd)  # closing releases the lock

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

    def _recover(self, exclusive: bool) -> None:
        """Remove what a crash can leave: temporary files and features without samples.

        Under the lock nothing is in flight, so every such file is a leftover; without a lock only
        files older than STALE_SECONDS are (a live writer commits a shard within seconds)."""
        cutoff = time.time() - (0 if exclusive else STALE_SECONDS)
        committed = {_shard_names(i)[1] for i in _list_shards(self.path)}
        for p in [*self.path.glob("*.tmp"), *self.path.glob(".*.tmp"), *self.path.glob("features-*.npy")]:
            if p.name in committed:
                continue
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
            except FileNotFoundError:  # another writer cleaned it first
                pass

    @property
    def num_rows(self) -> int:
        return len(self.done)

    def append(self, rows: Sequence[dict[str, Any]], features: np.ndarray | None = None,
               *, skip_stored: bool = False) -> int:
        """Write `rows` (and their `features` [len(rows), dim]) as one new shard; returns rows written.

        A key already stored (by this or another writer) is refused, or with `skip_stored` its row
        is dropped: two writers that sampled the same prompt store it once."""
        if not rows:
            return 0
        where = f"{self.path}: append"
        table = _rows_to_table(rows, where)
        keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))
        if len(set(keys)) != len(keys):
            raise QProbeError(f"{where}: duplicate (prompt_id, sample_idx) within the batch")
        features = self._check_features(features, len(rows), where)
        with self._locked():
            self._refresh()
            stored = [i for i, k in enumerate(keys) if k in self._done]
            if stored and not skip_stored:
                raise QProbeError(f"{where}: (prompt_id, sample_idx) = {keys[stored[0]]} is already stored")
            if stored:
                keep = np.setdiff1d(np.arange(len(keys)), stored)
                if len(keep) == 0:
                    return 0
                table = table.take(pa.array(keep))
                keys = [keys[i] for i in keep]
                features = None if features is None else features[keep]
            index = self._commit(table, features)
            self._shards.append(index)
            self._read.add(index)
            self._done.update(keys)
        return len(keys)

    def _check_features(self, features: np.ndarray | None, n: int, where: str) -> np.ndarray | None:
        spec = self.feature_spec
        if spec is None:
            if features is not None:
                raise QProbeError(f"{where}: this store has no feature spec, so it takes no features")
            return None
        if features is None:
            raise QProbeError(f"{where}: this store has a feature spec, so features are required")
        features = np.asarray(features)
        if features.shape != (n, spec.dim):
            raise QProbeError(f"{where}: features have shape {features.shape}, expected ({n}, {spec.dim})")
        if not np.isfinite(features).all():
            raise QProbeError(f"{where}: features contain NaN or inf")
        return np.ascontiguousarray(features, dtype=spec.dtype)

    def _commit(self, table: pa.Table, features: np.ndarray | None) -> int:
        """Write one shard under the first free number: features first, then the samples file.

        Each name is taken with a no-clobber link, so even writers without a working lock (some
        network file systems) cannot overwrite each other's shards."""
        index = (max(self._shards) + 1) if self._shards else 0
        while True:
            samples_name, features_name = _shard_names(index)
            if (self.path / samples_name).exists() or (
                    features is not None and not claim_new(self.path / features_name,
                                                        lambda f: np.save(f, features))):
                index += 1
                continue
            if not claim_new(self.path / samples_name, lambda f: pq.write_table(table, f)):
                index += 1  # taken between our check and our claim; our features stay orphaned
                continue
            fsync_dir(self.path)
            return index

    def write_pairs(self, pairs: Sequence[dict[str, Any]]) -> None:
        """Write (or replace) pairs.parquet: prompt_id, chosen, rejected (sample_idx values)."""
        table = pa.table(
            {
                "prompt_id": pa.array([p["prompt_id"] for p in pairs], pa.string()),
                "chosen": pa.array([p["chosen"] for p in pairs], pa.int32()),
                "rejected": pa.array([p["rejected"] for p in pairs], pa.int32()),
            }
        )
        atomic_write(self.path / "pairs.parquet", lambda f: pq.write_table(table, f))

    def update_meta(self, **info: Any) -> None:
        """Record non-identity information (e.g. "summary", "progress") in meta.json."""
        bad = [k for k in info if k not in NON_IDENTITY_KEYS and not k.startswith("_")]
        if bad:
            raise QProbeError(f"{self.path}: update_meta only takes progress keys, not {bad}")
        self.meta.update(_jsonable(info))
        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_json(self.path / "meta.json", self.meta)


def read_meta(path: Path) -> dict[str, Any]:
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
        self.meta = read_meta(self.path)
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
        self._shard_rows = [t.num_rows for t in tables]
        self._shard_columns = [set(t.column_names) for t in tables]
        self._set_cache: dict[str, Any] = {}  # feature sets and log-likelihoods, read once
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

    # -- feature sets and log-likelihoods written by `qprobe embed` (qprobe/embed.py) --------

    @property
    def feature_sets(self) -> dict[str, FeatureSpec]:
        """Every complete feature set: the folder's own features (named like `L19-last`) and the
        sets `qprobe embed` stored for every shard."""
        out: dict[str, FeatureSpec] = {}
        if self.feature_spec is not None:
            out[feature_set_name(self.feature_spec)] = self.feature_spec
        sets_file = self.path / EMBED_DIR / "sets.json"
        if sets_file.is_file() and self._embedded_complete():
            try:
                sets = json.loads(sets_file.read_text()).get("sets", {})
            except ValueError as e:
                raise QProbeError(f"{sets_file}: not valid JSON ({e})") from None
            for name, d in sets.items():
                spec = FeatureSpec.from_dict(d, where=f"{sets_file}: {name}")
                if all((self.path / EMBED_DIR / name / _shard_names(i)[1]).is_file() for i in self._shards):
                    out.setdefault(name, spec)
        return out

    def _embedded_complete(self) -> bool:
        return all((self.path / EMBED_DIR / f"loglik-{_shard_id(i)}.parquet").is_file() for i in self._shards)

    def features_of(self, name: str | None) -> np.ndarray:
        """Features of the named set [N, D] (None or the folder's own set name: `features`)."""
        if name is None or (self.feature_spec is not None and name == feature_set_name(self.feature_spec)):
            return self.features
        sets = self.feature_sets
        if name not in sets:
            raise QProbeError(f"{self.path}: no complete feature set {name!r} (have {sorted(sets)}; "
                              "`qprobe embed` makes more)")
        if name not in self._set_cache:
            spec = sets[name]
            old, self.feature_spec = self.feature_spec, spec
            try:
                parts = [self._load_features(self.path / EMBED_DIR / name / _shard_names(i)[1],
                                             n) for i, n in zip(self._shards, self._shard_rows)]
            finally:
                self.feature_spec = old
            self._set_cache[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._set_cache[name]

    def loglik(self) -> dict[str, np.ndarray] | None:
        """Each sample's log-likelihood under the model (temperature 1, untruncated):
        {"logprob_sum": [N] float64, "logprob_tokens": [N] int64, "logprob_mean": [N]}, from the
        samples' own columns (recorded while sampling) or else from `qprobe embed`; None if neither."""
        if "loglik" in self._set_cache:  # read once per Rollouts (CV asks for it per candidate)
            return self._set_cache["loglik"]
        self._set_cache["loglik"] = self._read_loglik()
        return self._set_cache["loglik"]

    def _read_loglik(self) -> dict[str, np.ndarray] | None:
        cols = self.table.column_names
        if "logprob_sum" in cols and self.table.column("logprob_sum").null_count == 0:
            s = self.table.column("logprob_sum").to_numpy().astype(np.float64)
            n = np.asarray(self.column("num_tokens"), dtype=np.int64)
        elif self._embedded_complete():
            parts = [pq.read_table(self.path / EMBED_DIR / f"loglik-{_shard_id(i)}.parquet",
                                   columns=["prompt_id", "sample_idx", "logprob_sum", "logprob_tokens"])
                     for i in self._shards]
            t = pa.concat_tables(parts)
            if (t.column("prompt_id").to_pylist() != self.column("prompt_id")
                    or t.column("sample_idx").to_pylist() != self.column("sample_idx")):
                raise QProbeError(f"{self.path / EMBED_DIR}: log-likelihood rows do not match the samples")
            s = t.column("logprob_sum").to_numpy().astype(np.float64)
            n = t.column("logprob_tokens").to_numpy().astype(np.int64)
        else:
            return None
        return {"logprob_sum": s, "logprob_tokens": n, "logprob_mean": s / np.maximum(n, 1)}

    def extra_inputs(self) -> dict[str, np.ndarray]:
        """The columns a probe may read beside the features, those the folder has: the
        log-likelihoods (`loglik()`) and `visible_pass` [N] from the `visible_reward` column
        (`qprobe score --visible`: 1 / 0 passes the prompt's shown tests, 0.5 where none)."""
        out = dict(self.loglik() or {})
        if "visible_reward" in self.table.column_names:
            v = self.table.column("visible_reward").to_numpy(zero_copy_only=False).astype(np.float64)
            out["visible_pass"] = np.where(np.isnan(v), 0.5, v)
        out.update(self.exec_inputs())
        out.update(self.reviewer_inputs(out))
        return out

    def reviewer(self) -> dict[str, np.ndarray] | None:
        """`qprobe review`'s columns once every shard has them ({"reviewer_sum",
        "reviewer_tokens", "reviewer_text_sum", "reviewer_text_tokens"}: [N]), else None."""
        if "reviewer" not in self._set_cache:
            files = [self.path / EMBED_DIR / REVIEW_FILE.format(_shard_id(i)) for i in self._shards]
            got = None
            if files and all(f.is_file() for f in files):
                keys = ["reviewer_sum", "reviewer_tokens", "reviewer_text_sum", "reviewer_text_tokens"]
                t = pa.concat_tables([pq.read_table(f, columns=["prompt_id", "sample_idx", *keys])
                                      for f in files])
                if (t.column("prompt_id").to_pylist() != self.column("prompt_id")
                        or t.column("sample_idx").to_pylist() != self.column("sample_idx")):
                    raise QProbeError(f"{self.path / EMBED_DIR}: reviewer rows do not match the samples")
                got = {k: t.column(k).to_numpy().astype(np.float64) for k in keys}
            self._set_cache["reviewer"] = got
        return self._set_cache["reviewer"]

    def reviewer_inputs(self, loglik: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reviewer extras: `reviewer_sum`, `reviewer_mean` (log p(instruction | program),
        summed / averaged over the instruction's tokens) and, with the coder log-likelihood,
        `coder_reviewer` = logprob_sum + reviewer_sum and `coder_reviewer_mean` = logprob_mean +
        reviewer_mean (Coder-Reviewer reranking); {} without `qprobe review`."""
        rv = self.reviewer()
        if rv is None:
            return {}
        out = {"reviewer_sum": rv["reviewer_sum"],
               "reviewer_mean": rv["reviewer_sum"] / np.maximum(rv["reviewer_tokens"], 1)}
        if "logprob_sum" in loglik:
            out["coder_reviewer"] = loglik["logprob_sum"] + out["reviewer_sum"]
            out["coder_reviewer_mean"] = loglik["logprob_mean"] + out["reviewer_mean"]
        return out

    def lacks_column(self, name: str) -> np.ndarray:
        """[N] bool: the rows whose shard has no column `name`. A column added to a folder
        (`qprobe score --visible`) is missing from shards appended later, and reads as null
        there, like a value that is null on purpose (a prompt that shows no tests)."""
        return np.repeat([name not in cols for cols in self._shard_columns], self._shard_rows)

    def exec_inputs(self) -> dict[str, np.ndarray]:
        """The execution extras (`qprobe signals`: error class of the shown test, MBR-exec
        agreement, model-written tests and CodeT), from the columns the folder has complete."""
        from qprobe.verifier.agreement import EXEC_COLUMNS, exec_extras

        cols = {c: self.column(c) for c in EXEC_COLUMNS if c in self.table.column_names}
        return exec_extras(cols, self.groups()[0]) if cols else {}

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

    def pair_rows(self) -> np.ndarray:
        """Row indices [P, 2] (chosen, rejected) of pairs.parquet's pairs, in its order."""
        table = self.pairs
        if table is None or table.num_rows == 0:
            raise QProbeError(f"{self.path}: no pairs.parquet (collect a preference task)")
        row_of = {(p, int(s)): i for i, (p, s) in enumerate(zip(self.prompt_ids.tolist(),
                                                                self.sample_idx.tolist()))}
        out = []
        for p, c, j in zip(table.column("prompt_id").to_pylist(),
                           table.column("chosen").to_pylist(), table.column("rejected").to_pylist()):
            try:
                out.append((row_of[(str(p), int(c))], row_of[(str(p), int(j))]))
            except (KeyError, TypeError, ValueError):
                raise QProbeError(f"{self.path}/pairs.parquet: pair ({p!r}, {c!r}, {j!r}) refers "
                                  "to a sample that is not in the rollouts") from None
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)

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
            columns[name] = pa.array(list(values), type=COLUMN_TYPES.get(name))
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
        fsync_dir(self.path)
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
