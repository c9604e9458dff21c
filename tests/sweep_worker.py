"""``pcl sweep SPEC`` interrupted at a known point: a signal sent after optimizer step N of the first trial.

    python tests/sweep_worker.py SPEC INT|KILL N
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sweep_worker.py SPEC INT N

(Positional arguments: torchrun would take an option such as ``--signal`` for an abbreviation of its own.)

The signal goes from rank 0 to its process group (:class:`helpers.SignalAt`), as a Ctrl-C in a terminal reaches
the launcher and every rank, so start it in a session of its own. Exits with ``pcl sweep``'s code.
"""

from __future__ import annotations

import argparse
import signal
import sys

from helpers import SignalAt

from pc_lightning.sweep.study import run_sweep

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("signal", choices=["INT", "KILL"])
    parser.add_argument("step", type=int, help="optimizer step of the first trial after which the signal is sent")
    args = parser.parse_args()
    sys.exit(run_sweep(args.spec, extra_callbacks=[SignalAt(args.step, signal.Signals[f"SIG{args.signal}"])]))
