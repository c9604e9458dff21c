"""Runs per hour of ``pcl ablate --workers N`` on this machine, N = 1 and 2, as a ratio measured in one run.

The same small grid (``--runs`` seeds of the baseline at the tiny size, ``--steps`` optimizer steps of 16 x 128
tokens each) is run three times, each into a fresh results directory, and timed end to end (worker start-up,
data loading, MLflow records and the report included, as a user waits for them):

* N = 1: one process with torch's default thread count (every core);
* N = 2: two worker processes with cores // 2 threads each (what ``--workers 2`` does);
* N = 2, oversubscribed: two workers that each take every core (``trainer.num_threads`` = cores, as every
  worker did before ``--workers`` shared the cores).

The figure that matters is the ratio of runs per hour against N = 1. On a machine other processes are using,
the ratios move with their load.

    python bench/workers.py [--runs 4] [--steps 40] [--data-cache DIR] [--out results/bench/workers.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pc_lightning import tracking
from pc_lightning.sweep.ablation import run_ablation
from pc_lightning.sweep.workers import available_cores, threads_per_worker
from timing import write_report  # bench/timing.py (this folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def timed_grid(workers: int, runs: int, steps: int, data_cache: str | None, threads: int | None) -> float:
    """Seconds for ``pcl ablate --workers N`` of ``runs`` runs into a fresh results directory."""
    with tempfile.TemporaryDirectory() as tmp:
        tracking.RESULTS_DIR = Path(tmp) / "results"
        overrides = [f"trainer.max_steps={steps}", f"trainer.val_every={steps}", "trainer.log_every=10",
                     "trainer.checkpoint_every=100000", "data.batch_size=16", "data.seq_len=128",
                     "data.val_batches=2", f"trainer.checkpoint_dir={Path(tmp) / 'checkpoints'}"]
        if data_cache:
            overrides.append(f"data.cache_dir={data_cache}")
        if threads is not None:
            overrides.append(f"trainer.num_threads={threads}")
        spec = {"name": "bench-workers", "base": str(ROOT / "conf" / "baseline.yaml"), "overrides": overrides,
                "variants": {"baseline": []}, "seeds": list(range(1, runs + 1))}
        spec_path = Path(tmp) / "bench-workers.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = run_ablation(str(spec_path), workers=workers)
        seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the grid with --workers {workers} failed (exit code {code})")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="runs in the grid (seeds of the baseline)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--data-cache", help="data.cache_dir (default: the config's)")
    parser.add_argument("--out", default="results/bench/workers.md")
    args = parser.parse_args()

    cores = available_cores()
    default_threads = torch.get_num_threads()
    configurations = [("1", 1, None, f"{default_threads} (torch's default)"),
                      ("2", 2, None, f"{threads_per_worker(2)} each (cores // 2)"),
                      ("2, oversubscribed", 2, cores, f"{cores} each (trainer.num_threads)")]
    timed_grid(1, 1, 2, args.data_cache, None)  # prepares the data cache (tokenizer, tokens) outside the timings
    rows = []
    for label, workers, threads, thread_text in configurations:
        seconds = timed_grid(workers, args.runs, args.steps, args.data_cache, threads)
        rows.append((label, thread_text, seconds, args.runs * 3600 / seconds, os.getloadavg()[1]))
    base = rows[0][3]
    lines = [f"# Runs per hour of `pcl ablate --workers N` ({cores} cores)", "",
             f"{args.runs} runs of the tiny baseline, {args.steps} steps of 16 x 128 tokens each, timed end to end "
             "(worker start-up, data loading, MLflow and the report included).", "",
             "The load average (5 min) after each configuration shows how busy the machine was otherwise: with other "
             "jobs running, the ratios move with their load.", "",
             "| N | threads per worker | wall time (s) | runs per hour | vs N = 1 | load average |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {threads} | {seconds:.0f} | {per_hour:.0f} | {per_hour / base:.2f}x | {load:.1f} |"
              for label, threads, seconds, per_hour, load in rows]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
