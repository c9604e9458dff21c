"""Seed statistics of ablation reports on hand-made run tables with known answers (no training)."""

from __future__ import annotations

import math

import pytest
import yaml

from pc_lightning.config import ConfigError
from pc_lightning.sweep.ablation import load_ablation
from pc_lightning.sweep.report import (RunRow, compare_all, plot_lr_sensitivity, summarize, summary_markdown)
from pc_lightning.sweep.statistics import mean_interval, paired_difference, seed_band, spread

VOCAB = 512
L0 = math.log(VOCAB)


def row(variant: str, seed: int, loss: float | None, lr: float = 3e-3, status: str = "finished",
        optimizer: str = "adamw", best: float | None = None) -> RunRow:
    return RunRow(key=f"{variant}|{optimizer}|lr={lr:g}|seed={seed}", variant=variant, optimizer=optimizer, lr=lr,
                  seed=seed, status=status, final_val_loss=loss, best_val_loss=loss if best is None else best,
                  tokens_per_sec=1000.0, parameters=1_000_000, spikes=0.0, last_val_step=10, vocab=VOCAB,
                  run_id=f"{variant}-{optimizer}-{lr}-{seed}")


def report_of(rows: list[RunRow], reference: str | None = None):
    variants = list(dict.fromkeys(r.variant for r in rows))
    optimizers = list(dict.fromkeys(r.optimizer for r in rows))
    groups = [summarize(v, o, [r for r in rows if (r.variant, r.optimizer) == (v, o)])
              for v in variants for o in optimizers if any((r.variant, r.optimizer) == (v, o) for r in rows)]
    return groups, compare_all(groups, reference or variants[0]), summary_markdown("t", groups, rows, reference)


def table_row(summary: str, section: str, variant: str, optimizer: str = "adamw") -> list[str]:
    """The cells of one variant's row in the table under the heading that starts with ``section``."""
    part = summary.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in part.splitlines() if x.startswith(f"| {variant} | {optimizer} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_spread_is_mean_and_sample_sd():
    s = spread([1.0, 2.0, 4.0])
    assert (s.mean, s.n) == (pytest.approx(7 / 3), 3)
    assert s.sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert spread([5.0]).sd is None and spread([]).mean is None


def test_textbook_paired_t_interval():
    # differences 0.1, 0.3, 0.2, 0.4: mean 0.25, sd = sqrt(0.05 / 3), t(0.975, 3) = 3.182446 (t table)
    reference = {1: 5.0, 2: 5.1, 3: 4.9, 4: 5.2}
    variant = {1: 5.1, 2: 5.4, 3: 5.1, 4: 5.6}
    d = paired_difference(variant, reference)
    half = 3.182446 * math.sqrt(0.05 / 3) / math.sqrt(4)
    assert d.n == 4 and d.unpaired == 0
    assert d.mean == pytest.approx(0.25)
    assert (d.low, d.high) == (pytest.approx(0.25 - half, abs=1e-6), pytest.approx(0.25 + half, abs=1e-6))
    assert d.low == pytest.approx(0.044574, abs=1e-6) and d.excludes_zero
    # two pairs: t(0.975, 1) = 12.7062
    d = mean_interval([1.0, 2.0])
    assert (d.low, d.high) == (pytest.approx(1.5 - 12.7062 * math.sqrt(0.5) / math.sqrt(2), abs=1e-4),
                               pytest.approx(1.5 + 12.7062 * math.sqrt(0.5) / math.sqrt(2), abs=1e-4))


def test_constant_shift_gives_a_zero_width_interval_at_the_shift():
    base = {1: 5.0, 2: 4.75, 3: 5.5, 4: 4.5}
    rows = [row("baseline", s, v) for s, v in base.items()] + [row("qk_norm", s, v - 0.125) for s, v in base.items()]
    groups, comparisons, summary = report_of(rows)
    d = comparisons[1].final_val_loss
    assert d.mean == d.low == d.high == -0.125 and d.n == 4 and d.excludes_zero
    assert groups[0].final_val_loss.n == 4
    assert table_row(summary, "Paired differences", "qk_norm")[2:4] == ["4", "-0.1250 [-0.1250, -0.1250] *"]
    assert table_row(summary, "Paired differences", "baseline")[2] == "reference"
    # the mean table shows mean ± sd and n
    sd = spread(base.values()).sd
    assert table_row(summary, "Mean over seeds", "baseline")[3:5] == ["4", f"{4.9375:.4f} ± {sd:.4f}"]
    assert "95% Student t-interval" in summary and "no confidence interval" not in summary


@pytest.mark.parametrize("shifts, marked", [
    ([-0.10, -0.12, -0.08], True),   # all below 0, small spread: the interval excludes 0
    ([-0.10, 0.15, 0.02], False),    # mixed signs: the interval contains 0
    ([0.05, 0.06, 0.04], True),      # worse than the reference, resolved
    ([0.0, 0.0, 0.0], False),        # identical: [0, 0] does not exclude 0
])
def test_marker_appears_exactly_when_the_interval_excludes_zero(shifts, marked):
    rows = [row("baseline", s, 5.0) for s in (1, 2, 3)] + [row("z_loss", s, 5.0 + d) for s, d in zip((1, 2, 3), shifts)]
    _, comparisons, summary = report_of(rows)
    d = comparisons[1].final_val_loss
    assert d.excludes_zero is marked
    assert (d.low > 0 or d.high < 0) is marked
    assert table_row(summary, "Paired differences", "z_loss")[3].endswith(" *") is marked


def test_one_seed_gives_no_interval_and_says_so():
    rows = [row("baseline", 7, 5.0), row("qk_norm", 7, 4.75)]
    _, comparisons, summary = report_of(rows)
    d = comparisons[1].final_val_loss
    assert d.n == 1 and d.mean == -0.25 and not d.has_interval and not d.excludes_zero
    assert "1 seed: no confidence interval" in summary
    assert table_row(summary, "Paired differences", "qk_norm")[3] == "-0.2500 (1 seed: no CI)"
    assert "±" not in table_row(summary, "Mean over seeds", "baseline")[4]
    assert "*" not in summary.split("## Paired differences", 1)[1].split("|---|", 1)[1]


def test_diverged_run_counts_as_l0_and_a_missing_seed_is_unpaired():
    rows = [row("baseline", s, 5.0) for s in (1, 2, 3)] + [
        row("qk_norm", 1, 4.75),
        row("qk_norm", 2, float("nan"), status="diverged", best=6.0),  # counts as l0 = ln(512)
        row("qk_norm", 3, None, status="failed"),  # no result: seed 3 has no partner
    ]
    groups, comparisons, summary = report_of(rows)
    qk = groups[1]
    assert qk.final_by_seed == {1: 4.75, 2: L0} and qk.best_by_seed == {1: 4.75, 2: 6.0}
    assert qk.diverged == 1 and qk.failed == 1
    d = comparisons[1].final_val_loss
    assert (d.n, d.unpaired) == (2, 1)
    assert d.mean == pytest.approx(((4.75 - 5.0) + (L0 - 5.0)) / 2)
    assert table_row(summary, "Paired differences", "qk_norm")[2] == "2 (1 unpaired)"
    assert "`qk_norm|adamw|lr=0.003|seed=3`: failed" in summary
    # a loss above l0 is capped at l0
    assert summarize("x", "adamw", [row("x", 1, 7.0)]).final_by_seed == {1: L0}


def test_reference_key_picks_the_reference(tmp_path):
    spec = {"name": "r", "base": "conf/baseline.yaml", "variants": {"baseline": [], "qk_norm": ["variant/qk_norm"]}}
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert load_ablation(path).reference_variant == "baseline"  # default: the first variant
    path.write_text(yaml.safe_dump({**spec, "reference": "qk_norm"}))
    assert load_ablation(path).reference_variant == "qk_norm"
    path.write_text(yaml.safe_dump({**spec, "reference": "qk_nrom"}))
    with pytest.raises(ConfigError, match="reference"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({**spec, "seeds": [1, 2, 1]}))
    with pytest.raises(ConfigError, match="seeds"):
        load_ablation(path)

    rows = [row("baseline", s, 5.0 + 0.01 * s) for s in (1, 2)] + [row("qk_norm", s, 4.5) for s in (1, 2)]
    _, comparisons, summary = report_of(rows, reference="qk_norm")
    assert "## Paired differences vs `qk_norm`" in summary
    assert table_row(summary, "Paired differences", "qk_norm")[2] == "reference"
    assert comparisons[0].final_val_loss.mean == pytest.approx(0.515)


def test_comparison_is_within_the_same_optimizer():
    rows = [row("baseline", s, 5.0, optimizer="adamw") for s in (1, 2)] + \
           [row("baseline", s, 4.0, optimizer="muon") for s in (1, 2)] + \
           [row("pc", s, 4.5, optimizer="adamw") for s in (1, 2)] + \
           [row("pc", s, 4.5, optimizer="muon") for s in (1, 2)] + \
           [row("tsvd", s, 4.5, optimizer="soap") for s in (1, 2)]  # no baseline / soap
    groups, comparisons, summary = report_of(rows)
    by = {(c.group.variant, c.group.optimizer): c for c in comparisons}
    assert by["pc", "adamw"].final_val_loss.mean == pytest.approx(-0.5)
    assert by["pc", "muon"].final_val_loss.mean == pytest.approx(0.5)
    assert by["tsvd", "soap"].reference is None
    assert "no `baseline` / soap runs" in summary


def test_lr_grid_statistics_are_per_seed_then_aggregated(tmp_path):
    lrs = [1e-3, 1e-2, 1e-1]
    # baseline: seed 1 diverges at 1e-1 (max stable 1e-2), seed 2 does not (max stable 1e-1)
    # qk_norm: both seeds stable up to 1e-1, a constant 0.25 lower at every LR
    table = {1e-3: 5.5, 1e-2: 5.0, 1e-1: 5.25}
    rows = []
    for s in (1, 2):
        for lr in lrs:
            diverged = s == 1 and lr == 1e-1
            rows.append(row("baseline", s, float("inf") if diverged else table[lr], lr=lr,
                            status="diverged" if diverged else "finished"))
            rows.append(row("qk_norm", s, table[lr] - 0.25, lr=lr))
    rows.append(row("qk_norm", 3, 5.0, lr=1e-2))  # seed 3 ran at one LR only: no LR statistics for it
    groups, comparisons, summary = report_of(rows)
    base, qk = groups
    assert base.lr == qk.lr == 1e-2  # lowest mean final loss
    assert base.max_stable_lr_by_seed == {1: 1e-2, 2: 1e-1}
    assert base.lr_sensitivity_by_seed == {1: pytest.approx((0.5 + 0 + (L0 - 5.0)) / 3),
                                           2: pytest.approx((0.5 + 0 + 0.25) / 3)}
    assert qk.max_stable_lr_by_seed == {1: 1e-1, 2: 1e-1} and qk.incomplete_seeds == [3]
    assert qk.lr_sensitivity.mean == pytest.approx(0.25) and qk.lr_sensitivity.sd == 0
    c = comparisons[1]
    # max stable LR ratio per seed: 10 and 1 -> geometric mean sqrt(10)
    assert math.exp(c.max_stable_lr_log.mean) == pytest.approx(math.sqrt(10))
    assert c.lr_sensitivity.n == 2 and c.lr_sensitivity.mean == pytest.approx(
        0.25 - (base.lr_sensitivity_by_seed[1] + base.lr_sensitivity_by_seed[2]) / 2)
    assert base.diverged_by_lr == {1e-3: 0, 1e-2: 0, 1e-1: 1}
    assert base.losses_by_lr[1e-1].mean == pytest.approx((L0 + 5.25) / 2)
    cells = table_row(summary, "LR grid", "qk_norm")
    assert cells[2] == "2" and cells[3] == "0.1 ×/÷ 1.00" and cells[5].startswith("3.16× [")
    assert "seed(s) 3 lack a result at some LR" in summary
    plot_lr_sensitivity(tmp_path / "lr.png", groups, L0)
    assert (tmp_path / "lr.png").stat().st_size > 0


def test_seed_band_is_mean_min_max_per_step():
    band = seed_band([{10: 5.0, 20: 4.0}, {10: 6.0, 20: 3.0, 30: 2.5}, {10: float("nan")}])
    assert band.steps == [10, 20, 30]
    assert band.mean == [5.5, 3.5, 2.5] and band.low == [5.0, 3.0, 2.5] and band.high == [6.0, 4.0, 2.5]
    assert band.n == [2, 2, 1]
