"""Files written whole or not at all, and the one cache folder.

Every file qprobe writes that another process (or a resume) may read goes through
`atomic_write_*`: the bytes go to a temporary name in the same folder, are fsynced, and the
temporary file is renamed over the target. A reader sees the old file or the new one, never half
of one; a crash leaves at most a `*.tmp` file that the next writer removes.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def cache_root() -> Path:
    """The qprobe cache folder: `$QPROBE_CACHE`, else `~/.cache/qprobe`.

    Converted models, compiled kernels, downloaded data sets and hash memos all live under it."""
    env = os.environ.get("QPROBE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qprobe"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any] | bytes) -> None:
    """Write `path` atomically: `write` is the bytes, or a function given the open binary file.

    The temporary file has a unique name, so several processes may write the same path at once
    (the last rename wins) without tearing each other's files."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, bytearray)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, text.encode())


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = True) -> None:
    atomic_write(path, (json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n").encode())


def remove_stale_tmp(folder: str | os.PathLike[str]) -> None:
    """Delete temporary files a crashed `atomic_write` left in `folder`."""
    for p in Path(folder).glob(".*.tmp"):
        try:
            p.unlink()
        except FileNotFoundError:  # another process removed it first
            pass


def claim_new(path: Path, write: Callable[[IO[bytes]], Any]) -> bool:
    """Create `path` with the bytes `write(f)` produces, atomically and only if it does not exist
    yet (False if it does): how several writers take unique names without a lock."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here: O_EXCL claims the name, then the rename fills it
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        os.replace(tmp, path)
        return True
    finally:
        if tmp.exists():
            tmp.unlink()


def save_weights_folder(out_dir: str | os.PathLike[str], tensors: dict[str, Any],
                        config: dict[str, Any], *, what: str,
                        weights: str = "probe.safetensors", config_name: str = "config.json") -> Path:
    """Write a folder of safetensors weights + a JSON config atomically: a temp folder beside it
    is filled, then renamed over `out_dir` (an older one of the same kind is moved aside first
    and deleted). Refuses a non-empty folder without `config_name`: it is not a `what`."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from qprobe.errors import QProbeError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QProbeError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / config_name).is_file():
        raise QProbeError(f"{out}: folder exists and is not a {what}; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / weights))
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():  # replace an older one: move it aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / what)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_weights_config(folder: str | os.PathLike[str], *, what: str, fmt: str,
                        weights: str, config_name: str = "config.json") -> tuple[dict, Path, Path]:
    """The JSON config of a folder written by `save_weights_folder`, checked: both files there,
    valid JSON, `format` == fmt. Returns (config, config path, weights path)."""
    from qprobe.errors import QProbeError

    d = Path(folder)
    cfg_path, w_path = d / config_name, d / weights
    if not cfg_path.is_file() or not w_path.is_file():
        raise QProbeError(f"{d}: not a {what} folder (needs {config_name} and {weights})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QProbeError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        raise QProbeError(f"{cfg_path}: format is not {fmt!r}")
    return cfg, cfg_path, w_path
