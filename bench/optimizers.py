"""Optimizers on the `tiny` preset at a fixed token budget: AdamW, Muon, SOAP, Gauss-Newton, layer-wise GN.

Each optimizer runs through the suite's own ``train()`` from its experiment preset (conf/baseline.yaml,
conf/muon.yaml, conf/soap.yaml, conf/gn.yaml; gn_layerwise = conf/gn.yaml with optim.name=gn_layerwise), at
the preset's learning rate, with the same model, data, seed and token budget (SOAP: see ``PRESETS``).
A GN outer step consumes inner_steps + 1 batches, so it gets proportionally fewer (outer) steps.

Recorded per (outer) step: the training loss on the step's fresh batch before the update, wall-clock time
of the step, tokens consumed. Reported:

* target = AdamW's loss at 80% of its steps (5-step trailing mean of the training loss, for every optimizer);
* steps (and tokens) each optimizer needs to reach it, as a ratio to AdamW (< 1 = fewer steps);
* the loss (same 5-step mean) at the fewest steps any optimizer ran: a per-iteration comparison;
* median wall-clock seconds per (outer) step, and its ratio to AdamW's;
* validation loss at the end of the budget (the suite's fixed validation windows).

Abreu et al. (arXiv 2510.09378) report full GN needing 5.4x fewer iterations than SOAP at 150M parameters
and large batches; this bench is a CPU-sized check of the same measurement, not a reproduction.

    python bench/optimizers.py [--tokens 102400] [--batch-size 8] [--seq-len 64] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from pc_lightning.config import batches_per_step, load_config, steps_for_budget
from pc_lightning.train import train

ROOT = Path(__file__).resolve().parent.parent
# SOAP: with vocab 4096 < max_precond_dim 10000 the embedding and head would get 4096 x 4096 rotations (~2 s per
# step on one CPU thread, 60 s for the first eigh). At paper scale the vocabulary (32000+) exceeds
# max_precond_dim and stays unrotated; max_precond_dim=1024 keeps that regime here.
PRESETS = {"adamw": ("baseline.yaml", []), "muon": ("muon.yaml", []),
           "soap": ("soap.yaml", ["optim.soap.max_precond_dim=1024"]),
           "gn": ("gn.yaml", []), "gn_layerwise": ("gn.yaml", ["optim.name=gn_layerwise"])}
SMOOTH = 5  # trailing window (steps) of the training loss used for the target


class StepRecorder(L.Callback):
    """Training loss, wall-clock seconds and tokens of every (outer) optimizer step."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.rows: list[dict] = []
        self._start = 0.0
        self._elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        self._elapsed += seconds
        step = trainer.global_step
        self.rows.append({"step": step, "loss": float(trainer.callback_metrics["train/loss"]), "seconds": seconds,
                          "elapsed": self._elapsed, "tokens": step * self.tokens_per_step})


def smoothed(losses: list[float]) -> list[float]:
    return [statistics.fmean(losses[max(0, i - SMOOTH + 1): i + 1]) for i in range(len(losses))]


def first_step_below(rows: list[dict], target: float) -> int | None:
    for row, loss in zip(rows, smoothed([r["loss"] for r in rows])):
        if loss <= target:
            return row["step"]
    return None


def run_one(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    path, extra = PRESETS[name]
    overrides = extra + [
        f"trainer.max_tokens={args.tokens}", f"data.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}",
        f"trainer.num_threads={args.threads}", f"trainer.seed={args.seed}", "trainer.progress_bar=false",
        f"trainer.checkpoint_dir={workdir / 'checkpoints'}", f"tracking.tracking_uri=sqlite:///{workdir}/bench.db",
        f"name=bench-{name}",
    ]
    cfg = load_config(ROOT / "conf" / path, overrides)
    steps = steps_for_budget(cfg)
    cfg.trainer.val_every = steps  # one validation, at the end of the budget
    cfg.trainer.checkpoint_every = steps
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * batches_per_step(cfg)
    recorder = StepRecorder(tokens_per_step)
    start = time.perf_counter()
    result = train(cfg, extra_callbacks=[recorder], quiet=True)
    return {"name": name, "status": result.status, "steps": result.step, "tokens_per_step": tokens_per_step,
            "val_loss": result.metrics.get("val/loss"), "wall": time.perf_counter() - start,
            "lr": cfg.optim.gn.inner_lr if name.startswith("gn") else cfg.optim.lr, "rows": recorder.rows}


def summarise(runs: list[dict]) -> tuple[float, list[dict]]:
    adamw = next(r for r in runs if r["name"] == "adamw")
    at = max(0, int(0.8 * len(adamw["rows"])) - 1)
    target = smoothed([r["loss"] for r in adamw["rows"]])[at]
    adamw_steps = first_step_below(adamw["rows"], target)
    adamw_sec = statistics.median(r["seconds"] for r in adamw["rows"][1:])
    common = min(len(run["rows"]) for run in runs)  # per-iteration comparison at the fewest steps any run took
    table = []
    for run in runs:
        steps = first_step_below(run["rows"], target)
        sec = statistics.median(r["seconds"] for r in run["rows"][1:])
        table.append({
            "name": run["name"], "lr": run["lr"], "steps_run": run["steps"], "tokens_per_step": run["tokens_per_step"],
            "steps_to_target": steps, "step_ratio": steps / adamw_steps if steps else None,
            "token_ratio": steps * run["tokens_per_step"] / (adamw_steps * adamw["tokens_per_step"]) if steps else None,
            "sec_per_step": sec, "sec_ratio": sec / adamw_sec, "val_loss": run["val_loss"], "wall": run["wall"],
            "common_step": common, "loss_at_common_step": smoothed([r["loss"] for r in run["rows"]])[common - 1],
            "status": run["status"],
        })
    return target, table


def write_markdown(path: Path, args: argparse.Namespace, target: float, table: list[dict]) -> None:
    def fmt(x, spec):
        return "not reached" if x is None else format(x, spec)

    lines = [
        "# Optimizers at a fixed token budget (tiny preset, CPU)", "",
        f"Model `model/tiny` (d 128, 4 layers, vocab 4096), batch {args.batch_size} x {args.seq_len} tokens, "
        f"budget {args.tokens} tokens, seed {args.seed}, {args.threads} CPU threads. Target loss = AdamW's "
        f"{SMOOTH}-step mean training loss at 80% of its steps = **{target:.3f}**. Ratios are to AdamW "
        "(steps < 1 = fewer steps; GN counts outer steps, each of inner_steps + 1 batches). Learning rates are "
        "the presets' (GN: inner_lr, 4 inner steps); SOAP runs with max_precond_dim 1024 so that the vocabulary "
        "dimension stays unrotated, as at paper scale.", "",
        "| optimizer | lr | steps run | tokens/step | steps to target | steps vs AdamW | tokens vs AdamW "
        f"| s/step | s/step vs AdamW | loss at step {table[0]['common_step']} | final val loss | run s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {r['steps_run']} | {r['tokens_per_step']} "
            f"| {fmt(r['steps_to_target'], 'd')} | {fmt(r['step_ratio'], '.2f')} | {fmt(r['token_ratio'], '.2f')} "
            f"| {r['sec_per_step']:.3f} | {r['sec_ratio']:.1f}x | {r['loss_at_common_step']:.3f} "
            f"| {fmt(r['val_loss'], '.3f')} | {r['wall']:.0f} |")
    lines += ["", "Curves: optimizers.png (training loss vs step and vs wall-clock seconds, 5-step mean).", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, runs: list[dict], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        rows = run["rows"]
        loss = smoothed([r["loss"] for r in rows])
        axes[0].plot([r["step"] for r in rows], loss, label=run["name"])
        axes[1].plot([r["elapsed"] for r in rows], loss, label=run["name"])
        axes[2].plot([r["tokens"] for r in rows], loss, label=run["name"])
    for ax, xlabel in zip(axes, ["(outer) step", "training wall-clock (s)", "tokens"]):
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"training loss ({SMOOTH}-step mean)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=102400, help="token budget per optimizer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on a busy 2-core box oversubscribes)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--optimizers", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    if "adamw" not in args.optimizers:
        parser.error("adamw is the reference: keep it in --optimizers")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for name in args.optimizers:
            runs.append(run_one(name, args, Path(tmp)))
            run = runs[-1]
            print(f"{name}: {run['steps']} steps, {run['wall']:.0f} s, val {run['val_loss']}", flush=True)
    target, table = summarise(runs)
    write_markdown(args.out / "optimizers.md", args, target, table)
    plot(args.out / "optimizers.png", runs, target)
    (args.out / "optimizers.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "target": target, "table": table, "runs": runs}, indent=1))
    print((args.out / "optimizers.md").read_text())


if __name__ == "__main__":
    main()
