"""The progress display of ``pcl ablate`` and ``pcl sweep``: runs done / total, time elapsed, an ETA, and the
step of every run in progress.

* On a terminal (the stream is a TTY) one status line is redrawn in place as the runs step, e.g.
  ``ablation 'quick': 3/18 runs · elapsed 1:02 · ETA 4:10 · step 40/80 of pc|muon|lr=config|seed=1337``,
  and each finished run leaves one line above it.
* Anywhere else (a log file, a pipe, CI) only the line per finished run is written, e.g.
  ``[3/18] pc|muon|lr=config|seed=1337: finished, val/loss=5.1234 (19s) · elapsed 1:02 · ETA 4:10``.

ETA = runs still to do x (elapsed / runs ended by this command), so with parallel workers it counts their
overlap; before the first run has ended it is unknown (``ETA ?``). Runs in progress report their optimizer step
through :class:`StepProgress`, a Lightning callback (from worker processes through a queue, see
:mod:`pc_lightning.sweep.workers`).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO

import lightning as L

REDRAW_EVERY = 0.2  # seconds between redraws of the live line


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Runs ``done`` of ``total`` at the start (e.g. finished by an earlier invocation); see the module docstring.
    A context manager: leaving it clears the live line."""

    def __init__(self, label: str, total: int, done: int = 0, stream: TextIO | None = None,
                 live: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.done = label, total, done
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.clock = clock
        self.started = clock()
        self.ended_here = 0  # runs this command has seen end (the ETA's rate)
        self.running: dict[str, tuple[int, int]] = {}  # run -> (step, max steps)
        self._drawn_at: float | None = None

    def eta(self) -> float | None:
        if self.ended_here == 0:
            return None
        return max(0, self.total - self.done) * (self.clock() - self.started) / self.ended_here

    def times(self) -> str:
        eta = self.eta()
        eta_text = "?" if eta is None else format_seconds(eta)
        return f"elapsed {format_seconds(self.clock() - self.started)} · ETA {eta_text}"

    def step(self, run: str, step: int, max_steps: int) -> None:
        """A run in progress reached optimizer step ``step`` of ``max_steps`` (redrawn on a terminal only)."""
        self.running[run] = (step, max_steps)
        if self.live and (self._drawn_at is None or self.clock() - self._drawn_at >= REDRAW_EVERY):
            self._draw()

    def finished(self, run: str, outcome: str, error: bool = False, done: int | None = None) -> None:
        """One line for a run that ended (on stderr if ``error``). ``done``: the number of runs done now, where
        other processes finish runs too (a study's workers); else one more than before."""
        self.running.pop(run, None)
        self.done = self.done + 1 if done is None else done
        self.ended_here += 1
        self.message(f"[{self.done}/{self.total}] {run}: {outcome} · {self.times()}",
                     sys.stderr if error else self.stream)

    def message(self, text: str, stream: TextIO | None = None) -> None:
        """A line of its own (above the live line on a terminal)."""
        self._clear()
        print(text, file=stream or self.stream, flush=True)
        if self.live:
            self._draw()

    def close(self) -> None:
        self._clear()

    def __enter__(self) -> Progress:
        if self.live:
            self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status_line(self) -> str:
        parts = [f"{self.label}: {self.done}/{self.total} runs", self.times()]
        # the step first: a narrow terminal cuts the end of the line
        parts += [f"step {step}/{max_steps} of {run}" for run, (step, max_steps) in self.running.items()]
        return " · ".join(parts)

    def _draw(self) -> None:
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r\x1b[K" + self.status_line()[:width])
        self.stream.flush()
        self._drawn_at = self.clock()

    def _clear(self) -> None:
        if self.live and self._drawn_at is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn_at = None


class StepProgress(L.Callback):
    """Reports ``(step, max_steps)`` of a run to ``report`` after optimizer steps, at most every
    ``min_interval`` seconds (and at the last step)."""

    def __init__(self, report: Callable[[int, int], None], min_interval: float = 0.5):
        self.report, self.min_interval = report, min_interval
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        now = time.monotonic()
        last_step = trainer.global_step >= trainer.max_steps
        if last_step or self._last is None or now - self._last >= self.min_interval:
            self._last = now
            self.report(trainer.global_step, trainer.max_steps)
