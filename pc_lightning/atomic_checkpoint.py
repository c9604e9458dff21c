"""Checkpoint files that are either the previous complete checkpoint or the new complete one, never a part.

Lightning 2.6.6's ``TorchCheckpointIO`` serialises the checkpoint into memory and writes it through an fsspec
transaction: into a temporary file from ``tempfile.mkstemp()`` (the system temp directory), then
``shutil.move`` onto the target. That is a rename, atomic, only while the temp directory and the checkpoint
directory share a filesystem. Otherwise (``/tmp`` on tmpfs, checkpoints on a disk or network share)
``shutil.move`` copies the bytes over ``last.ckpt`` in place, and a process killed during the copy leaves a
truncated ``last.ckpt`` where the previous good one was. Nothing is fsynced either, so after a power loss the
renamed file may be empty.

:class:`AtomicCheckpointIO` writes local checkpoints the safe way: serialise straight into ``.<name>.<pid>.tmp``
in the checkpoint's own directory, flush and fsync it, ``os.replace`` it onto the target (atomic on POSIX
within a directory), then fsync the directory so that the rename itself is durable. A process killed at any
point leaves the target untouched (at worst a stray ``.tmp`` file, removed by the next successful save of the
same target). Remote paths (``s3://``, ...) keep Lightning's own writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)
        for stray in target.parent.glob(f".{target.name}.*.tmp"):  # left by a process killed while writing
            stray.unlink(missing_ok=True)
