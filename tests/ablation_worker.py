"""``pcl ablate SPEC --workers 2`` interrupted at a known point: a worker sends SIGINT to the command after optimizer
step N of its first run, as a Ctrl-C in the terminal would reach it.

    python tests/ablation_worker.py SPEC N

Start it in a session of its own. Exits with ``pcl ablate``'s code.
"""

from __future__ import annotations

import sys

from helpers import SignalParentAt

from pc_lightning.sweep.ablation import run_ablation

if __name__ == "__main__":
    sys.exit(run_ablation(sys.argv[1], workers=2, extra_callbacks=[SignalParentAt(int(sys.argv[2]))]))
