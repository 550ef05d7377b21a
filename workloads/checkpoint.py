"""Atomic torch.save and the training checkpoint directory layout.

Layout: checkpoint_dir/ckpt-{step:07d}.pt (the last `keep` of them) plus latest.pt, a copy of the
newest. Every file is written to a temporary name in the same directory and renamed with os.replace,
so a reader (or a resumed run after preemption) never sees a half-written file.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LATEST_NAME = "latest.pt"
CHECKPOINT_GLOB = "ckpt-*.pt"


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write bytes to path atomically (temporary file in the same directory + os.replace).

    Args:
        data: file contents.
        path: destination; its parent directory is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save obj to path atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def save_checkpoint(state: dict, checkpoint_dir: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Write ckpt-{step:07d}.pt and latest.pt, then delete all but the newest `keep` ckpt files.

    Args:
        state: picklable training state (tensors, dicts, numbers).
        checkpoint_dir: directory (created if missing).
        step: completed training steps (zero-padded in the file name).
        keep: number of ckpt-*.pt files to keep (latest.pt is kept in addition).

    Returns:
        Path of the step checkpoint.
    """
    directory = Path(checkpoint_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = directory / f"ckpt-{step:07d}.pt"
    atomic_write_bytes(buffer.getvalue(), path)
    atomic_write_bytes(buffer.getvalue(), directory / LATEST_NAME)
    # Zero-padded names sort by step.
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[:-keep]:
        old.unlink()
    return path


def load_latest(checkpoint_dir: str | os.PathLike | None) -> dict | None:
    """Load checkpoint_dir/latest.pt if it exists.

    Args:
        checkpoint_dir: directory or None.

    Returns:
        The saved state, or None when there is nothing to resume from.
    """
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / LATEST_NAME
    if not path.exists():
        return None
    # weights_only: the state is tensors, numbers, strings and containers; nothing to unpickle.
    return torch.load(path, map_location="cpu", weights_only=True)
