"""Small file helpers: durable atomic JSON writes and sha256 (registry and components)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from aml_pipelines.errors import ConfigError


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically and durably (see `write_bytes`)."""
    write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path`, atomically and durably.

    Temp file in the same folder, fsync, rename onto `path`, fsync of the folder: after a crash or
    a power cut the file is the old one or the new one, never empty or half written (rename alone
    can reach the disk before the data does). The file gets the mode a plain open gives (0666
    less the umask), not mkstemp's 0600: a local registry shared by a service account and its
    users must be readable by them as its model files are.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the renames and unlinks done in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_json_object(path: Path, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object a step reads as input (model.json, registration.json, package.json).

    Missing, unreadable, not JSON, not an object, or without a `required` field: one ConfigError
    naming the file (and the fields), never a traceback.
    """
    try:
        record = read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} is not a JSON object")
    if missing := [key for key in required if key not in record]:
        raise ConfigError(f"{path} lacks the field(s) {missing}")
    return record


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
