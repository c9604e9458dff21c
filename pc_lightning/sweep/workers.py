"""Local worker processes (``pcl ablate --workers N``, ``pcl sweep --workers N``) that share this machine's cores.

**Threads.** torch gives every process as many threads as the machine has cores, so N workers each taking
every core fight over them: measured on 2 cores (tiny model, batch 16x128), one 2-thread process made 9.3k
tokens/s, two 1-thread processes together 9.7k, two 2-thread processes together only 5.4k. So each local worker
gets ``cores // N`` threads (at least 1; ``cores``: the CPUs this process may run on); a run's explicit
``trainer.num_threads`` still wins (:func:`pc_lightning.train.train` sets it). ``bench/workers.py`` measures
runs per hour for N = 1 and 2.

**Jobs** (:func:`run_jobs`, used by ``pcl ablate``): N spawned Python processes (no fork of torch state) take
jobs from one queue, so a slow job does not hold up the others, and send back each job's result and the step
progress of the job in hand. The workers run in process groups of their own, so a Ctrl-C in the terminal (or
a SIGTERM) reaches the parent only, which then sends each worker one SIGINT: the run in hand ends as Ctrl-C
ends a single run (its MLflow run closed KILLED), jobs not started are dropped, and the parent waits for every
worker to exit before it raises the ``KeyboardInterrupt`` itself. A worker also stops taking jobs once its
parent has gone.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

STEP, DONE = "step", "done"  # events from the workers
# job(item, report_step) -> result; report_step(step, max_steps); both run in a worker process
Job = Callable[[Any, Callable[[int, int], None]], Any]


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a cgroup cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // max(1, workers))


def oversubscription_warning(threads: set[int | None], workers: int, cores: int) -> str | None:
    """A warning line when the runs' explicit ``trainer.num_threads`` times ``workers`` exceeds the cores: the pin
    wins over :func:`threads_per_worker`, and oversubscribed workers lose throughput (the module docstring)."""
    explicit = [t for t in threads if t]
    if workers > 1 and explicit and max(explicit) * workers > cores:
        return (f"pcl: warning: trainer.num_threads={max(explicit)} in each of {workers} workers oversubscribes "
                f"this machine's {cores} cores (leave it unset: each worker then gets cores // workers threads)")
    return None


def thread_environment(workers: int) -> dict[str, str]:
    """Environment of a worker started as a command (``pcl sweep --workers``): torch and the BLAS libraries read
    their default thread count from it."""
    threads = str(threads_per_worker(workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _serve(job: Job, tasks, events, threads: int, results_dir: str, parent: int) -> None:
    """A worker process: run jobs from ``tasks`` until the end marker, a Ctrl-C from the parent, or the parent
    has gone."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only; it stops each worker once
    # ... with SIGINT, also where the command was started with SIGINT ignored (in the background of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    from pc_lightning import tracking

    torch.set_num_threads(threads)
    tracking.RESULTS_DIR = Path(results_dir)  # the parent's (tests point it elsewhere in-process)
    try:
        while os.getppid() == parent and (task := tasks.get()) is not None:
            index, item = task
            result = job(item, lambda step, max_steps: events.put((STEP, index, (step, max_steps))))
            events.put((DONE, index, result))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(130)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_jobs(job: Job, items: list, workers: int, on_step: Callable[[int, int, int], None],
             on_done: Callable[[int, Any], None]) -> list[int]:
    """Run ``job`` on every item in ``workers`` processes with ``cores // workers`` threads each. Calls
    ``on_step(index, step, max_steps)`` and ``on_done(index, result)`` in this process as events arrive; returns
    the indices of the items that never reported a result (their worker died). A Ctrl-C or SIGTERM stops every
    worker (see the module docstring) and is raised here as ``KeyboardInterrupt`` once they have exited."""
    from pc_lightning import tracking

    context = multiprocessing.get_context("spawn")
    tasks, events = context.Queue(), context.Queue()
    for task in enumerate(items):
        tasks.put(task)
    n = max(1, min(workers, len(items)))
    for _ in range(n):
        tasks.put(None)
    tasks.cancel_join_thread()  # jobs a Ctrl-C leaves in the queue must not keep this process from exiting
    args = (job, tasks, events, threads_per_worker(workers), str(tracking.RESULTS_DIR.resolve()), os.getpid())
    procs = [context.Process(target=_serve, args=args, name=f"pcl-worker-{i}") for i in range(n)]
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    reported: set[int] = set()

    def receive() -> None:  # until every worker has exited and its events are read
        while True:
            alive = any(p.is_alive() for p in procs)
            try:
                kind, index, payload = events.get(timeout=0.2)
            except queue.Empty:
                if alive:
                    continue
                return
            if kind == STEP:
                on_step(index, *payload)
            else:
                reported.add(index)
                on_done(index, payload)

    try:
        try:
            for p in procs:
                p.start()
            receive()
        except KeyboardInterrupt:
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGINT)
            receive()
            raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.pid is not None:
                p.join()
    return [i for i in range(len(items)) if i not in reported]
