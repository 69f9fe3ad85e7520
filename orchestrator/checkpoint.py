"""Checkpoints: written atomically (temp file, fsync, rename) with a SHA-256 checksum.

A checkpoint file is one header line `NAMMCKPT1 <sha256 of payload> <payload bytes>\n` and
a pickled payload (the ES must be pickled: pycma's state is a Python object). Only the newest
`keep` are kept. Loading walks from the newest back and skips, with a warning, any file that
is truncated or fails its checksum, so a crash mid-write never loses the run.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
MAGIC = b"NAMMCKPT1"
PATTERN = re.compile(r"^gen-(\d{6})\.ckpt$")


class CorruptCheckpoint(ValueError):
    pass


def checkpoint_path(directory: Path, generation: int) -> Path:
    return Path(directory) / f"gen-{generation:06d}.ckpt"


def generation_of(path) -> int:
    """The generation count in a checkpoint's file name (gen-000012.ckpt -> 12)."""
    return int(PATTERN.match(Path(path).name).group(1))


def write_checkpoint(directory, generation: int, state: dict, keep: int = 3) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    header = b"%s %s %d\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    target = checkpoint_path(directory, generation)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return target


def read_checkpoint(path) -> dict:
    path = Path(path)
    data = path.read_bytes()
    newline = data.find(b"\n")
    try:
        magic, digest, size = data[:newline].split(b" ")
        size = int(size)
    except ValueError:
        raise CorruptCheckpoint(f"{path}: no valid checkpoint header") from None
    if magic != MAGIC:
        raise CorruptCheckpoint(f"{path}: not a namm checkpoint")
    payload = data[newline + 1:]
    if len(payload) != size:
        raise CorruptCheckpoint(f"{path}: truncated ({len(payload)} of {size} payload bytes)")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptCheckpoint(f"{path}: checksum mismatch")
    return pickle.loads(payload)


def list_checkpoints(directory) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def load_latest(directory) -> Optional[tuple[Path, dict]]:
    """The newest readable checkpoint, skipping corrupt ones (reported); None if there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, read_checkpoint(path)
        except (CorruptCheckpoint, pickle.UnpicklingError, EOFError) as e:
            log.warning("skipping corrupt checkpoint: %s; falling back to the previous one", e)
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
