"""``pcl report``: render an ablation's ``results/<name>/`` or a study's ``results/sweeps/<name>/``.

Everything is read back from storage -- MLflow runs (tags, params, metric histories) and, for studies, the
Optuna storage named by the parent run's ``pcl.storage`` tag; nothing is recomputed or re-trained. ``pcl
ablate`` and ``pcl sweep`` call the same functions at the end, so their output and ``pcl report`` agree.

Ablation summary, one row per variant x optimizer (seeds averaged; with several LRs, at the best LR):
final and best val loss, perplexity exp(final loss), tokens/s, parameters, loss spikes (``spike/count``),
diverged runs, maximum stable LR and the Wortsman LR sensitivity (:mod:`pc_lightning.sweep.lr_sensitivity`)
with l0 = ln(vocab).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

import yaml

from pc_lightning import tracking
from pc_lightning.config import ConfigError, TrackingConfig
from pc_lightning.sweep import runs
from pc_lightning.sweep.lr_sensitivity import lr_sensitivity, max_stable_lr
from pc_lightning.sweep.space import is_journal

DONE = ("finished", "diverged")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------
# Ablations
# --------------------------------------------------------------------------------------------------


@dataclass
class RunRow:
    key: str
    variant: str
    optimizer: str
    lr: float
    seed: int
    status: str  # finished | diverged | failed | killed | running
    final_val_loss: float | None
    best_val_loss: float | None
    tokens_per_sec: float | None
    parameters: int | None
    spikes: float | None
    last_val_step: int | None  # MLflow step of the last validation
    vocab: int | None
    run_id: str
    error: str = ""

    @property
    def initial_loss(self) -> float | None:
        return math.log(self.vocab) if self.vocab else None


def _run_status(run) -> str:
    return run.data.tags.get("status") or run.info.status.lower()


def run_row(mlflow_client, run) -> RunRow:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    history = sorted(mlflow_client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: (m.step, m.timestamp))
    values = [m.value for m in history]
    finite = [v for v in values if math.isfinite(v)]
    parameters = params.get("derived.parameters")
    vocab = params.get("model.vocab_size")
    return RunRow(
        key=tags.get("pcl.key", run.info.run_id), variant=tags.get("pcl.variant", "?"),
        optimizer=tags.get("pcl.optimizer", "?"), lr=float(tags.get("pcl.lr") or params.get("optim.lr") or "nan"),
        seed=int(tags.get("pcl.seed", "0")), status=_run_status(run),
        final_val_loss=values[-1] if values else None, best_val_loss=min(finite) if finite else None,
        tokens_per_sec=metrics.get("perf/tokens_per_sec"),
        parameters=int(parameters) if parameters not in (None, "None") else None,
        spikes=metrics.get("spike/count"), last_val_step=history[-1].step if history else None,
        vocab=int(vocab) if vocab not in (None, "None") else None, run_id=run.info.run_id,
        error=tags.get("error", "") or tags.get("diverged_message", ""))


def select_runs(rows: list[RunRow]) -> list[RunRow]:
    """One run per key: the newest finished/diverged one, else the newest attempt (rows are oldest first)."""
    chosen: dict[str, RunRow] = {}
    for row in rows:
        current = chosen.get(row.key)
        if current is None or row.status in DONE or current.status not in DONE:
            chosen[row.key] = row
    return list(chosen.values())


@dataclass
class GroupSummary:
    variant: str
    optimizer: str
    lr: float | None  # the best LR of the grid (the only one without an LR grid)
    final_val_loss: float | None
    best_val_loss: float | None
    val_ppl: float | None
    tokens_per_sec: float | None
    parameters: int | None
    spikes: float | None
    diverged: int
    runs: int
    failed: int
    max_stable_lr: float | None
    lr_sensitivity: float | None
    losses_by_lr: dict[float, float | None]


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return mean(values) if values else None


def summarize(variant: str, optimizer: str, rows: list[RunRow]) -> GroupSummary:
    results = [r for r in rows if r.status in DONE]
    by_lr: dict[float, list[RunRow]] = {}
    for r in sorted(results, key=lambda r: r.lr):
        by_lr.setdefault(r.lr, []).append(r)
    # l(eta): mean final loss over seeds; any diverged seed makes the LR count as diverged (None)
    losses: dict[float, float | None] = {
        lr: None if any(r.status == "diverged" for r in rs) else _mean([r.final_val_loss for r in rs])
        for lr, rs in by_lr.items()}
    l0 = next((r.initial_loss for r in results if r.initial_loss), None)
    stable = {lr: loss for lr, loss in losses.items() if loss is not None}
    best_lr = min(stable, key=stable.get) if stable else None
    at_best = [r for r in by_lr.get(best_lr, []) if r.status == "finished"]
    final = _mean([r.final_val_loss for r in at_best])
    spikes = [r.spikes for r in results if r.spikes is not None]
    return GroupSummary(
        variant=variant, optimizer=optimizer, lr=best_lr, final_val_loss=final,
        best_val_loss=_mean([r.best_val_loss for r in at_best]),
        val_ppl=math.exp(final) if final is not None else None,
        tokens_per_sec=_mean([r.tokens_per_sec for r in results if r.status == "finished"]),
        parameters=next((r.parameters for r in rows if r.parameters), None),
        spikes=sum(spikes) if spikes else None,
        diverged=sum(r.status == "diverged" for r in results), runs=len(results),
        failed=len(rows) - len(results),
        max_stable_lr=max_stable_lr(losses, l0) if l0 and len(losses) > 1 else None,
        lr_sensitivity=lr_sensitivity(losses, l0) if l0 and len(losses) > 1 else None,
        losses_by_lr=losses)


def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def summary_markdown(name: str, groups: list[GroupSummary], rows: list[RunRow]) -> str:
    lines = [f"# Ablation `{name}`", "",
             f"{sum(g.runs for g in groups)} runs with results, {sum(g.diverged for g in groups)} diverged, "
             f"{sum(g.failed for g in groups)} failed. Seeds averaged; with an LR grid the losses are at the best "
             "LR. LR sens. = Wortsman et al. 2023 E_lr[min(l, l0) - min_lr l], l0 = ln(vocab); "
             "max stable LR = largest LR with no divergence and loss < l0.", "",
             "| variant | optimizer | LR | final val loss | best val loss | val ppl | tokens/s | params | spikes "
             "| diverged | max stable LR | LR sens. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        if g.runs == 0:
            lines.append(f"| {g.variant} | {g.optimizer} | failed | | | | | | | | | |")
            continue
        diverged = "no" if g.diverged == 0 else f"yes ({g.diverged}/{g.runs})"
        lines.append(
            f"| {g.variant} | {g.optimizer} | {_fmt(g.lr, 'g')} | {_fmt(g.final_val_loss, '.4f')} "
            f"| {_fmt(g.best_val_loss, '.4f')} | {_fmt(g.val_ppl, '.1f')} | {_fmt(g.tokens_per_sec, ',.0f')} "
            f"| {_fmt_params(g.parameters)} | {_fmt(g.spikes, '.0f')} | {diverged} | {_fmt(g.max_stable_lr, 'g')} "
            f"| {_fmt(g.lr_sensitivity, '.4f')} |")
    failed = [r for r in rows if r.status not in DONE]
    if failed:
        lines += ["", "## Runs without a result", ""]
        lines += [f"- `{r.key}`: {r.status}" + (f": {r.error.splitlines()[0][:300]}" if r.error else "")
                  for r in sorted(failed, key=lambda r: r.key)]
    return "\n".join(lines) + "\n"


def write_runs_csv(path: Path, rows: list[RunRow]) -> None:
    fields = list(asdict(rows[0]).keys()) if rows else ["key"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def _label(g: GroupSummary) -> str:
    return f"{g.variant} / {g.optimizer}"


def _style(g: GroupSummary, groups: list[GroupSummary]) -> dict:
    """One colour per variant, one line style per optimizer."""
    variants = list(dict.fromkeys(x.variant for x in groups))
    optimizers = list(dict.fromkeys(x.optimizer for x in groups))
    return {"color": f"C{variants.index(g.variant) % 10}",
            "linestyle": ["-", "--", ":", "-."][optimizers.index(g.optimizer) % 4]}


def _finish(plt, fig, ax, path: Path) -> None:
    """Grid, legend and PNG for the one-axis plots."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(path: Path, mlflow_client, groups: list[GroupSummary], rows: list[RunRow]) -> None:
    """Validation loss vs optimizer step, one line per seed of each variant x optimizer at its best LR."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for g in groups:
        picked = [r for r in rows if (r.variant, r.optimizer) == (g.variant, g.optimizer) and r.status in DONE
                  and (g.lr is None or r.lr == g.lr)]
        for j, r in enumerate(sorted(picked, key=lambda r: r.seed)):
            history = sorted(mlflow_client.get_metric_history(r.run_id, "val/loss"), key=lambda m: m.step)
            ax.plot([m.step for m in history], [m.value for m in history], **_style(g, groups),
                    alpha=1.0 if j == 0 else 0.4, label=_label(g) if j == 0 else None, marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss per variant")
    _finish(plt, fig, ax, path)


def plot_lr_sensitivity(path: Path, groups: list[GroupSummary], initial_loss: float | None) -> None:
    """Final val loss vs learning rate (diverged = l0, drawn as a cross)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for g in groups:
        if not g.losses_by_lr:
            continue
        lrs = sorted(g.losses_by_lr)
        ys = [g.losses_by_lr[lr] if g.losses_by_lr[lr] is not None else initial_loss for lr in lrs]
        style = _style(g, groups)
        ax.plot(lrs, ys, marker="o", **style, label=_label(g))
        crossed = [lr for lr in lrs if g.losses_by_lr[lr] is None]
        ax.scatter(crossed, [initial_loss] * len(crossed), marker="x", color=style["color"], s=60)
    if initial_loss is not None:
        ax.axhline(initial_loss, color="gray", linestyle="--", linewidth=1, label="l0 = ln(vocab)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("LR sensitivity (x = diverged)")
    _finish(plt, fig, ax, path)


def plot_spectra(path: Path, mlflow_client, groups: list[GroupSummary], rows: list[RunRow], keys: list[str]) -> None:
    """Histories of the recorded ``spectrum/*`` metrics (singular values, condition numbers), first 12 keys."""
    plt = _plt()
    keys = keys[:12]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for g in groups:
        picked = [r for r in rows if (r.variant, r.optimizer) == (g.variant, g.optimizer) and r.status in DONE
                  and (g.lr is None or r.lr == g.lr)]
        if not picked:
            continue
        run = min(picked, key=lambda r: r.seed)
        for ax, key in zip(axes.flat, keys):
            history = sorted(mlflow_client.get_metric_history(run.run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], **_style(g, groups), label=_label(g))
    for ax, key in zip(axes.flat, keys):
        ax.set_title(key, fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_ablation(mlflow_client, parent, out_dir: Path) -> Path:
    """Write summary.md, runs.csv and the PNG plots for an ablation parent run into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = parent.data.tags["pcl.name"]
    children = runs.children(mlflow_client, parent)
    rows = select_runs([run_row(mlflow_client, r) for r in children])
    variants = json.loads(parent.data.tags.get("pcl.variants", "[]")) or sorted({r.variant for r in rows})
    optimizers = json.loads(parent.data.tags.get("pcl.optimizers", "[]")) or sorted({r.optimizer for r in rows})
    rows.sort(key=lambda r: (variants.index(r.variant) if r.variant in variants else len(variants),
                             optimizers.index(r.optimizer) if r.optimizer in optimizers else len(optimizers),
                             r.lr, r.seed))
    groups = [summarize(v, o, [r for r in rows if (r.variant, r.optimizer) == (v, o)])
              for v in variants for o in optimizers if any((r.variant, r.optimizer) == (v, o) for r in rows)]
    (out_dir / "summary.md").write_text(summary_markdown(name, groups, rows))
    write_runs_csv(out_dir / "runs.csv", rows)
    plot_loss_curves(out_dir / "loss_curves.png", mlflow_client, groups, rows)
    if len({r.lr for r in rows}) > 1:
        l0 = next((r.initial_loss for r in rows if r.initial_loss), None)
        plot_lr_sensitivity(out_dir / "lr_sensitivity.png", groups, l0)
    spectrum_keys = sorted({k for r in children for k in r.data.metrics if k.startswith("spectrum/")})
    if spectrum_keys:
        plot_spectra(out_dir / "spectrum.png", mlflow_client, groups, rows, spectrum_keys)
    return out_dir


def ablation_dir(name: str) -> Path:
    return tracking.RESULTS_DIR / name


def publish_ablation(mlflow_client, parent_id: str) -> Path:
    """Render results/<name>/ and attach it to the parent run as artifacts."""
    parent = mlflow_client.get_run(parent_id)
    out_dir = render_ablation(mlflow_client, parent, ablation_dir(parent.data.tags["pcl.name"]))
    mlflow_client.log_artifacts(parent_id, str(out_dir), artifact_path="report")
    return out_dir


# --------------------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------------------


def study_dir(name: str) -> Path:
    return tracking.RESULTS_DIR / "sweeps" / name


def render_study(study, mlflow_client, parent, out_dir: Path) -> Path:
    """Write summary.md, trials.csv, best_params.json and Optuna's history/slice plots into out_dir."""
    import optuna
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    run_of_trial = {r.data.tags.get("pcl.trial"): r for r in runs.children(mlflow_client, parent)
                    if r.data.tags.get("status") != "crashed"}
    param_names = sorted({p for t in trials for p in t.params})
    rows = []
    for t in trials:
        run = run_of_trial.get(str(t.number))
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "diverged": bool(t.user_attrs.get("diverged", False)),
                     "last_step": t.last_step, **{p: t.params.get(p) for p in param_names},
                     "mlflow_run_id": run.info.run_id if run else "",
                     "tokens_per_sec": run.data.metrics.get("perf/tokens_per_sec") if run else None})
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    metric = parent.data.tags.get("pcl.metric", "objective")
    lines = [f"# Study `{study.study_name}`", "",
             f"Direction: {study.direction.name.lower()}; trials: "
             + ", ".join(f"{n} {k.lower()}" for k, n in counts.items()) + ".", ""]
    best = None
    if complete:
        best = study.best_trial
        lines += [f"Best trial {best.number}: {metric} = {best.value:.4f}", "",
                  *[f"- `{k}` = {v!r}" for k, v in best.params.items()], ""]
    header = ["trial", "state", "value", "diverged", *param_names]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        params = [format(r[p], ".4g") if isinstance(r[p], float) else str(r[p]) for p in param_names]
        lines.append("| " + " | ".join([str(r["number"]), r["state"], value, "yes" if r["diverged"] else "no",
                                        *params]) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (out_dir / "best_params.json").write_text(json.dumps(
        {"number": best.number, "value": best.value, "params": best.params} if best else {}, indent=2))

    if complete:
        import warnings

        plt = _plt()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for filename, plot in (("optimization_history.png", optuna.visualization.matplotlib.plot_optimization_history),
                                   ("slice.png", optuna.visualization.matplotlib.plot_slice)):
                axes = plot(study)
                fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                fig.tight_layout()
                fig.savefig(out_dir / filename, dpi=110)
                plt.close(fig)
    return out_dir


def publish_study(study, mlflow_client, parent_id: str) -> Path:
    """Render results/sweeps/<name>/ and attach it, and the best trial, to the study's parent run."""
    parent = mlflow_client.get_run(parent_id)
    out_dir = render_study(study, mlflow_client, parent, study_dir(study.study_name))
    mlflow_client.log_artifacts(parent_id, str(out_dir), artifact_path="report")
    best = json.loads((out_dir / "best_params.json").read_text())
    if best:
        mlflow_client.log_metric(parent_id, "best_value", best["value"])
        mlflow_client.set_tag(parent_id, "best_trial", str(best["number"]))
        for k, v in best["params"].items():
            mlflow_client.set_tag(parent_id, f"best.{k}", str(v))
    return out_dir


# --------------------------------------------------------------------------------------------------
# pcl report
# --------------------------------------------------------------------------------------------------


def report(name_or_spec: str, tracking_uri: str | None = None) -> int:
    """Re-render an ablation's or study's results from MLflow (and the study's Optuna storage) alone."""
    path = Path(name_or_spec)
    kinds = ["ablation", "study"]
    name = name_or_spec
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        kinds = ["study"] if "study_name" in data else ["ablation"]
        name = data.get("study_name") or data.get("name") or name
    uri = tracking_uri or tracking.tracking_uri(TrackingConfig())
    mlflow_client = tracking.client(uri)
    for kind in kinds:
        parent = runs.find_parent(mlflow_client, kind, name)
        if parent is not None:
            break
    else:
        raise ConfigError("name", f"no ablation or study named '{name}' in {uri}")
    if kind == "ablation":
        out_dir = render_ablation(mlflow_client, parent, ablation_dir(name))
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = parent.data.tags["pcl.storage"]
        if is_journal(storage):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            storage = JournalStorage(JournalFileBackend(storage))
        out_dir = render_study(optuna.load_study(study_name=name, storage=storage), mlflow_client, parent,
                               study_dir(name))
    print(f"{kind} '{name}': report written to {out_dir}")
    return 0
