"""Opening a checkpoint file named on the command line (``pcl train --resume``, ``pcl merge``).

:func:`open_checkpoint` loads the file with its tensors memory-mapped (``torch.load(mmap=True)``), so reading an
entry such as ``mlflow_run_id`` costs little whatever the model's size, and turns a missing, truncated or foreign
file into one :class:`CheckpointError` that names it. Lightning and ``torch.save`` write zip archives
whose directory sits at the end of the file: a file cut short keeps the zip signature at its start but has no
directory at its end.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable

ZIP_SIGNATURE = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint given to a command that cannot be used (missing, truncated, not a checkpoint, another model's);
    the message names the file and what is wrong. ``pcl`` prints it as one line and exits with 2."""


def open_checkpoint(path: str | Path, required: Iterable[str] = ("state_dict",)) -> dict:
    """The checkpoint's top-level dict (tensors memory-mapped); CheckpointError unless it has every ``required``
    entry."""
    import torch  # here, not at the top: the command line imports CheckpointError before it knows it needs torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with open(path, "rb") as f:
        signature = f.read(len(ZIP_SIGNATURE))
    archive = zipfile.is_zipfile(path)
    if signature == ZIP_SIGNATURE and not archive:
        raise CheckpointError(f"{path}: truncated or damaged checkpoint ({path.stat().st_size} bytes, no zip directory "
                         "at its end)")
    try:  # mmap needs the zip format; files of torch.save(..., _use_new_zipfile_serialization=False) load whole
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=archive)
    except Exception as e:  # anything the unpickler can raise on bytes that are not a checkpoint
        reason = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint written by pcl (holds a {type(checkpoint).__name__}, "
                         "not a dict)")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint written by pcl train (no {', '.join(map(repr, missing))})")
    return checkpoint
