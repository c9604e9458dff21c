"""The progress display of pcl ablate / pcl sweep (one line per run in a log file, a live line on a terminal),
and the thread count of local workers."""

from __future__ import annotations

import io

from pc_lightning.progress import Progress, format_seconds
from pc_lightning.sweep.workers import thread_environment, threads_per_worker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_count_runs_and_estimate_the_rest():
    clock, out = Clock(), io.StringIO()
    with Progress("ablation 'x'", total=5, done=1, stream=out, clock=clock) as progress:
        assert not progress.live  # a StringIO is no terminal
        progress.step("a", 3, 10)  # steps are not logged line by line
        clock.now += 30
        progress.finished("a", "finished, val/loss=5.0000 (30s)")
        clock.now += 60
        progress.finished("b", "FAILED: ValueError: no", error=True)
    # 3 runs left at 45 s per run ended here
    assert out.getvalue() == "[2/5] a: finished, val/loss=5.0000 (30s) · elapsed 0:30 · ETA 1:30\n"
    assert progress.done == 3 and progress.eta() == 90.0


def test_eta_is_unknown_before_a_run_ends_and_done_can_come_from_elsewhere():
    clock, out = Clock(), io.StringIO()
    progress = Progress("sweep 's'", total=4, stream=out, clock=clock)
    assert progress.eta() is None and progress.times() == "elapsed 0:00 · ETA ?"
    clock.now += 3725
    progress.finished("trial 5", "val/loss=4.1000 (20s)", done=3)  # other workers finished two meanwhile
    assert out.getvalue() == "[3/4] trial 5: val/loss=4.1000 (20s) · elapsed 1:02:05 · ETA 1:02:05\n"


def test_live_line_on_a_terminal_shows_the_steps_of_runs_in_progress():
    clock, out = Clock(), io.StringIO()
    with Progress("ablation 'x'", total=2, stream=out, live=True, clock=clock) as progress:
        progress.step("baseline|adamw", 3, 6)
        assert progress.status_line() == "ablation 'x': 0/2 runs · elapsed 0:00 · ETA ? · step 3/6 of baseline|adamw"
        clock.now += 1
        progress.step("baseline|adamw", 6, 6)
        progress.finished("baseline|adamw", "finished")
    text = out.getvalue()
    assert "\r\x1b[K" + "ablation 'x': 0/2 runs · elapsed 0:01 · ETA ? · step 6/6 of baseline|adamw" in text
    assert "\r\x1b[K[1/2] baseline|adamw: finished · elapsed 0:01 · ETA 0:01\n" in text
    assert text.endswith("\r\x1b[K")  # the live line is cleared at the end


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.6, 61, 3600, 36061)] == ["0:00", "1:00", "1:01", "1:00:00", "10:01:01"]


def test_local_workers_share_the_cores():
    assert threads_per_worker(1, cores=2) == 2
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(4, cores=2) == 1  # at least one
    assert threads_per_worker(3, cores=8) == 2
    assert thread_environment(2)["OMP_NUM_THREADS"] == str(threads_per_worker(2))
