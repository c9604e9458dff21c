"""``pcl train`` whose N-th checkpoint stops half-way through its write, for a test to SIGKILL it there.

    python tests/checkpoint_worker.py --stall-at N --ready FILE -- --config conf/baseline.yaml key=value ...

The stall sits wherever the checkpoint's bytes first reach a file, whichever way the installed code writes
them: ``torch.save`` into an open file (the suite's :class:`pc_lightning.atomic_checkpoint.AtomicCheckpointIO`),
or ``os.sendfile``, with which ``shutil.move`` copies a finished temp file onto the target across filesystems
(Lightning's own writer when the system temp directory is elsewhere). Half of the bytes are written, flushed,
then ``FILE`` is created and the process sleeps until it is killed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import torch

from pc_lightning.cli import main


def stall_at(n: int, ready: Path) -> None:
    checkpoints = 0
    save, sendfile = torch.save, os.sendfile

    def stall() -> None:
        ready.touch()
        time.sleep(3600)

    def stalling_save(obj, f, *args, **kwargs):
        nonlocal checkpoints
        if isinstance(obj, dict) and "state_dict" in obj:
            checkpoints += 1
        if checkpoints == n and hasattr(f, "fileno") and not isinstance(f, io.BytesIO):
            data = io.BytesIO()
            save(obj, data, *args, **kwargs)
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
            f.flush()
            stall()
        return save(obj, f, *args, **kwargs)

    def stalling_sendfile(out_fd, in_fd, offset, count):
        if checkpoints == n:
            half = os.fstat(in_fd).st_size // 2
            sent = 0
            while sent < half:
                sent += sendfile(out_fd, in_fd, sent, half - sent)
            stall()
        return sendfile(out_fd, in_fd, offset, count)

    torch.save, os.sendfile = stalling_save, stalling_sendfile


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stall-at", type=int, required=True, help="the checkpoint (1 = first) to stall")
    parser.add_argument("--ready", type=Path, required=True, help="created once the write has stalled")
    args, train_args = parser.parse_known_args()
    stall_at(args.stall_at, args.ready)
    sys.exit(main(["train", *[a for a in train_args if a != "--"]]))
