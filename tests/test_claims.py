"""Claims (positive controls): the metric reductions, the verdict rule on synthetic run tables with known answers,
every shipped claim file, and a tiny dry run of one claim through ``pcl claims``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from pc_lightning.config import ConfigError, TrackingConfig
from pc_lightning.sweep.ablation import load_ablation
from pc_lightning.sweep.claims import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, CheckSpec, ClaimSpec, claim_files,
                                       decide, evaluate, summary_markdown, ClaimOutcome)
from pc_lightning.sweep.lr_sensitivity import max_stable_lr
from pc_lightning.sweep.report import AblationReport, RunRow, summarize, summary_markdown as ablation_summary
from pc_lightning.sweep.run_metrics import MetricSpec, reduce_history
from pc_lightning.sweep.statistics import PairedDifference

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512


# ------------------------------------------------------------------ metric reductions


def test_reductions_of_a_known_history():
    points = [(0, 4.0), (10, 2.0), (20, 8.0), (30, 6.0)]
    r = lambda reduce, **kw: reduce_history(MetricSpec("x", reduce, **kw), points)  # noqa: E731
    assert (r("first"), r("last"), r("mean"), r("max"), r("min")) == (4.0, 6.0, 5.0, 8.0, 2.0)
    assert r("drift") == 2.0 and r("max_over_median") == 8.0 / 5.0
    assert r("growth") == 6.0 / 4.0  # last quarter / first quarter (one value each)
    assert r("first_step_at_or_below", threshold=2.0) == 10.0
    assert r("first_step_at_or_below", threshold=1.0) is None  # never reached
    assert r("max", after_step=25) == 6.0
    assert reduce_history(MetricSpec("x", "max_abs"), [(0, -9.0), (1, 3.0)]) == 9.0
    assert reduce_history(MetricSpec("x", "last_abs"), [(0, 1.0), (1, -3.0)]) == 3.0
    # non-finite values (a blow-up) are dropped; several keys at one step are pooled (last: their mean)
    assert reduce_history(MetricSpec("x", "max"), [(0, 1.0), (1, math.inf), (2, math.nan)]) == 1.0
    assert reduce_history(MetricSpec("x", "last"), [(5, 1.0), (5, 3.0), (0, 9.0)]) == 2.0
    assert reduce_history(MetricSpec("x", "mean"), []) is None


def test_metric_keys_take_globs():
    spec = MetricSpec("attn/max_logit/*", "max")
    assert spec.keys(["attn/max_logit/0", "attn/max_logit/1", "logits/log_z"]) == ["attn/max_logit/0",
                                                                                   "attn/max_logit/1"]
    assert MetricSpec("logits/log_z").keys(["logits/log_z", "x"]) == ["logits/log_z"]
    with pytest.raises(ConfigError, match="threshold"):
        MetricSpec("val/loss", "first_step_at_or_below").check("steps")


def test_stable_fraction_counts_a_collapsed_run_as_unstable():
    l0 = 6.0
    losses = {1e-2: 3.0, 1e-1: 4.8, 3e-1: 5.5}  # 1e-1 kept 1.2 of the best LR's 3.0 improvement: 40%
    assert max_stable_lr(losses, l0) == 3e-1  # default: ended below l0
    assert max_stable_lr(losses, l0, fraction=0.5) == 1e-2
    assert max_stable_lr(losses, l0, fraction=0.3) == 1e-1


# ------------------------------------------------------------------ the verdict rule


def test_decide_is_the_stated_rule():
    interval = lambda lo, hi: PairedDifference((lo + hi) / 2, lo, hi, 3)  # noqa: E731
    assert decide(interval(-0.3, -0.1), "below", 0.0) == "pass"
    assert decide(interval(0.1, 0.3), "below", 0.0) == "fail"
    assert decide(interval(-0.1, 0.1), "below", 0.0) == "open"
    assert decide(interval(0.0, 0.0), "below", 0.0) == "fail"  # exactly at the margin: not below it
    assert decide(interval(0.02, 0.08), "below", 0.1) == "pass"  # within a non-inferiority margin
    assert decide(interval(0.1, 0.3), "above", 0.0) == "pass"
    assert decide(interval(-0.3, 0.0), "above", 0.0) == "fail"
    assert decide(PairedDifference(-1.0, None, None, 1), "below", 0.0) == "open"  # one pair: no interval
    assert decide(None, "below", 0.0) == "open"


def row(variant: str, seed: int, loss: float, lr: float = 1e-2, optimizer: str = "adamw", status: str = "finished",
        **metrics: float) -> RunRow:
    return RunRow(key=f"{variant}|{optimizer}|lr={lr:g}|seed={seed}", variant=variant, optimizer=optimizer, lr=lr,
                  seed=seed, status=status, final_val_loss=loss, best_val_loss=loss, tokens_per_sec=1.0,
                  parameters=100, spikes=0.0, last_val_step=10, vocab=VOCAB, run_id=f"{variant}{seed}{lr}",
                  metrics=dict(metrics))


def report_of(rows: list[RunRow], specs: dict[str, MetricSpec], reference: str = "baseline") -> AblationReport:
    pairs = list(dict.fromkeys((r.variant, r.optimizer) for r in rows))
    groups = [summarize(v, o, [r for r in rows if (r.variant, r.optimizer) == (v, o)], specs) for v, o in pairs]
    return AblationReport("t", rows, groups, reference, specs, [])


CLAIM = ClaimSpec(title="t", paper="p", checks=[
    CheckSpec(name="lower loss", measure="final_val_loss", variant="pc", expect="below"),
    CheckSpec(name="lower gmcn", measure="gmcn", variant="pc", expect="below"),
])
SPECS = {"gmcn": MetricSpec("spectrum/gmcn", "mean", scale="log")}


@pytest.mark.parametrize("loss_shift, gmcn_factor, verdict", [
    ([-0.10, -0.12, -0.08], [0.5, 0.6, 0.55], REPRODUCED),        # both intervals below: reproduced
    ([+0.10, +0.12, +0.08], [0.5, 0.6, 0.55], NOT_REPRODUCED),    # loss resolved the other way
    ([-0.10, +0.15, 0.02], [0.5, 0.6, 0.55], INCONCLUSIVE),       # loss interval contains 0
    ([-0.10, -0.12, -0.08], [1.0, 1.0, 1.0], NOT_REPRODUCED),     # gmcn ratio exactly 1: not lower
])
def test_verdict_on_synthetic_tables(loss_shift, gmcn_factor, verdict):
    rows = [row("baseline", s, 5.0 + 0.1 * s, gmcn=100.0 * s) for s in (1, 2, 3)]
    rows += [row("pc", s, 5.0 + 0.1 * s + d, gmcn=100.0 * s * f) for s, d, f in zip((1, 2, 3), loss_shift,
                                                                                      gmcn_factor)]
    v = evaluate(CLAIM, report_of(rows, SPECS), ["adamw"])
    assert v.verdict == verdict
    loss, gmcn = v.results
    assert loss.difference.mean == pytest.approx(sum(loss_shift) / 3)
    assert gmcn.log and math.exp(gmcn.difference.mean) == pytest.approx(math.prod(gmcn_factor) ** (1 / 3))
    if verdict == REPRODUCED:
        assert v.why.startswith("every check's 95% interval lies on the claimed side")
    elif verdict == NOT_REPRODUCED:
        decisive = loss if loss.outcome == "fail" else gmcn
        assert decisive.check.name in v.why and "lies above" in v.why
    else:
        assert "lower loss" in v.why and "includes 0" in v.why


def test_constant_shift_passes_with_a_zero_width_interval_and_one_seed_is_inconclusive():
    # losses below l0 = ln(512) ~ 6.24 (a loss above it is capped); differences exact in binary: -0.5 both seeds
    rows = [row("baseline", s, 3.5 + s, gmcn=10.0) for s in (1, 2)] + [row("pc", s, 3.0 + s, gmcn=5.0) for s in (1, 2)]
    v = evaluate(CLAIM, report_of(rows, SPECS), ["adamw"])
    assert v.verdict == REPRODUCED and v.results[0].difference.low == v.results[0].difference.high
    one = [row("baseline", 1, 5.0, gmcn=10.0), row("pc", 1, 4.0, gmcn=5.0)]
    v = evaluate(CLAIM, report_of(one, SPECS), ["adamw"])
    assert v.verdict == INCONCLUSIVE and "only 1 paired seed(s)" in v.why


def test_checks_across_optimizers_and_against_another_variant_and_missing_values():
    """A check may compare any two groups (GN claim: gn vs soap); a seed without a value (a target never reached)
    is left out of the pairs."""
    specs = {"steps": MetricSpec("val/loss", "first_step_at_or_below", threshold=4.0, scale="log")}
    rows = [row("warm", s, 4.0, optimizer="soap", steps=100.0 * s) for s in (1, 2, 3)]
    rows += [row("warm", s, 4.0, optimizer="gn", steps=20.0 * s) for s in (1, 2)]
    rows.append(row("warm", 3, 4.0, optimizer="gn"))  # seed 3 never reached the target
    claim = ClaimSpec("t", "p", [CheckSpec(name="gn fewer steps", measure="steps", variant="warm", optimizer="gn",
                                           against="warm", against_optimizer="soap", expect="below", margin=0.5)])
    rep = report_of(rows, specs, reference="warm")
    v = evaluate(claim, rep, ["soap", "gn"])
    (r,) = v.results
    assert (r.variant, r.against) == (("warm", "gn"), ("warm", "soap"))
    assert r.difference.n == 2 and r.difference.unpaired == 1
    assert math.exp(r.difference.mean) == pytest.approx(0.2) and r.outcome == "pass"  # 5x fewer: ratio 0.2 < 0.5
    assert rep.group("warm", "gn").metrics_missing["steps"] == [3]
    text = ablation_summary("t", rep.groups, rows, "warm", specs)
    assert "### `steps`" in text and "seed(s) 3" in text


def test_summary_section_states_claim_measurement_rule_and_verdict():
    rows = [row("baseline", s, 5.0, gmcn=10.0) for s in (1, 2, 3)]
    rows += [row("pc", s, 4.8 + 0.01 * s, gmcn=5.0) for s in (1, 2, 3)]
    spec = load_ablation(ROOT / "conf" / "ablation" / "claims" / "pc.yaml")
    claim = ClaimSpec("PC", "the paper says", CLAIM.checks, note="small")
    rep = report_of(rows, SPECS)
    v = evaluate(claim, rep, ["adamw"])
    table = ablation_summary("t", rep.groups, rows, "baseline", SPECS)
    assert "### `gmcn`: `spectrum/gmcn`, mean" in table and "| pc | adamw | 3 | 5 ×/÷ 1.00 | 0.5× [0.5×, 0.5×] * |" in table
    spec.claim = claim
    text = summary_markdown([ClaimOutcome("pc", spec, v, runs=6, wall_seconds=125.0, seeds=[1, 2, 3])])
    assert "| [pc](#pc) | *reproduced* |" in text and "| 6 | 2 min |" in text
    assert "**The paper's claim.** the paper says" in text and "**At this size.** small" in text
    assert "| lower loss | -0.18 [" in text and "95% interval < 0" in text and "| pass |" in text
    assert "**Verdict: reproduced.**" in text


# ------------------------------------------------------------------ the shipped claim files


CLAIMS = claim_files()


def test_there_is_a_claim_file_per_claim():
    assert {p.stem for p in CLAIMS} >= {"pc", "tsvd", "gauss_newton", "spike_no_more", "rybakov", "wortsman"}


@pytest.mark.parametrize("path", CLAIMS, ids=lambda p: p.stem)
def test_claim_file_has_a_claim_seeds_and_its_own_results_folder(path):
    from pc_lightning.sweep.ablation import combinations, run_config, warm_start_config

    spec = load_ablation(path)  # checks name existing variants, optimizers and measures (ConfigError otherwise)
    assert spec.claim is not None and spec.claim.checks
    assert len(spec.seeds) >= 3
    assert spec.output == f"claims/{path.stem}"
    for combo in combinations(spec):  # every run's config composes and validates
        run_config(spec, combo, [], None)
    if spec.warm_start is not None:
        warm_start_config(spec, [], None)
    with pytest.raises(ConfigError):
        claim_files(["no-such-claim"])


# ------------------------------------------------------------------ one claim through the real command


@pytest.mark.slow
def test_dry_run_of_one_claim_through_pcl_claims(data_cache, results_dir, capsys):
    from pc_lightning.cli import main

    overrides = tiny_overrides(data_cache, results_dir, **{"trainer.max_steps": 4, "trainer.val_every": 2})
    assert main(["claims", "tsvd", "--seeds", "0,1", *overrides]) == 0
    out = capsys.readouterr().out
    assert "claim 'tsvd':" in out
    summary = (results_dir / "claims" / "summary.md").read_text()
    assert '<a id="tsvd"></a>' in summary and "**The paper's claim.**" in summary
    section = summary.split('<a id="tsvd"></a>', 1)[1].split("<a id=", 1)[0]
    assert "seeds 0, 1" in section and "**Verdict: " in section
    assert any(v in section for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE))
    assert "| [pc](#pc) | not run |" in summary  # the other claims are listed, not run
    report = results_dir / "claims" / "tsvd"
    assert (report / "summary.md").exists() and (report / "runs.csv").exists() and (report / "metrics.png").exists()
    # re-rendering from MLflow alone gives the same summary
    assert main(["claims", "tsvd", "--no-run"]) == 0
    assert (results_dir / "claims" / "summary.md").read_text() == summary


def test_pcl_claims_passes_workers_and_seeds_to_each_ablation(monkeypatch, results_dir):
    """``pcl claims NAME --workers N --seeds ...`` runs each claim's ablation N runs at a time with those seeds."""
    import pc_lightning.sweep.ablation as ablation
    from pc_lightning.cli import main

    calls = []
    monkeypatch.setattr(ablation, "run_ablation",
                        lambda path, overrides, workers=1, seeds=None: calls.append((Path(path).stem, workers, seeds)) or 0)
    assert main(["claims", "tsvd", "pc", "--workers", "2", "--seeds", "0,1"]) == 0
    assert calls == [("tsvd", 2, [0, 1]), ("pc", 2, [0, 1])]


# ------------------------------------------------------------------ pieces the claims read


def test_independent_weight_decay_does_not_scale_with_the_peak_lr(tiny_cfg):
    """Wortsman et al.'s independent decay: p -= s_t * lambda * p, so torch's AdamW/Muon get lambda / lr."""
    from pc_lightning.model import Llama
    from pc_lightning.optim.factory import build_optimizer

    for name, extra in (("adamw", {}), ("muon", {"optim.name": "muon"})):
        for lr in (1e-2, 1e-1):
            cfg = tiny_cfg(**{"optim.lr": lr, "optim.muon.adamw_lr": lr, "optim.weight_decay": 1e-4,
                              "optim.independent_weight_decay": True, **extra})
            cfg.model.vocab_size = VOCAB
            opt = build_optimizer(Llama(cfg.model), cfg.optim)
            decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
            assert decayed and all(g["weight_decay"] * g["lr"] == pytest.approx(1e-4) for g in decayed), name
    cfg = tiny_cfg(**{"optim.lr": 1e-1, "optim.weight_decay": 0.1})  # the default: torch's lr-coupled decay
    cfg.model.vocab_size = VOCAB
    opt = build_optimizer(Llama(cfg.model), cfg.optim)
    assert max(g["weight_decay"] for g in opt.param_groups) == 0.1


def test_flops_per_token_counts_each_layer_by_its_kind(tiny_cfg):
    """A dense model's count is the analytic one; a TSVD model's follows its ranks, r(m + n) + r per matrix."""
    from pc_lightning.layers import iter_layers
    from pc_lightning.model import Llama, flops_per_token, model_flops_per_token

    cfg = tiny_cfg()
    cfg.model.vocab_size = VOCAB
    dense = Llama(cfg.model)
    assert model_flops_per_token(dense, 32) == pytest.approx(flops_per_token(cfg.model, 32))
    tsvd_cfg = tiny_cfg(**{"model.linear": "tsvd", "model.tsvd.targets": "[ffn,attn_out,qk,v]",
                           "model.tsvd.init_rank_fraction": 0.25})
    tsvd_cfg.model.vocab_size = VOCAB
    tsvd = Llama(tsvd_cfg.model)
    layers = [layer for _, layer in iter_layers(tsvd) if getattr(layer, "rank", None) is not None]
    assert layers
    saved = sum(l.out_features * l.in_features - (l.rank * (l.out_features + l.in_features) + l.rank) for l in layers)
    assert model_flops_per_token(tsvd, 32) == pytest.approx(flops_per_token(cfg.model, 32) - 6 * saved)
    assert model_flops_per_token(tsvd, 32) < model_flops_per_token(dense, 32)


@pytest.mark.slow
def test_warm_start_is_trained_once_and_shared(tmp_path, data_cache, results_dir):
    """warm_start: one run trained first; every combination starts from its last.ckpt; a re-run reuses it."""
    from pc_lightning import tracking
    from pc_lightning.sweep import runs
    from pc_lightning.sweep.ablation import run_ablation

    spec = tmp_path / "warm.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "warm", "base": str(ROOT / "conf" / "baseline.yaml"), "variants": {"v": []},
        "optimizers": {"adamw": [], "muon": ["optim/muon"]}, "seeds": [0],
        "warm_start": ["trainer.max_steps=4", "trainer.checkpoint_every=4"]}))
    overrides = tiny_overrides(data_cache, results_dir, **{"trainer.max_steps": 2, "trainer.val_every": 2})
    assert run_ablation(str(spec), overrides) == 0
    client = tracking.client(tracking.tracking_uri(TrackingConfig()))
    parent = runs.find_parent(client, "ablation", "warm")
    kids = runs.children(client, parent)
    warm = [r for r in kids if r.data.tags.get("pcl.key") == "warm_start"]
    assert len(warm) == 1 and Path(warm[0].data.tags["pcl.checkpoint"]).exists()
    grid = [r for r in kids if r.data.tags.get("pcl.key") != "warm_start"]
    assert len(grid) == 2 and {r.data.tags.get("pcl.init_from") for r in grid} == {warm[0].data.tags["pcl.checkpoint"]}
    # resuming the grid (one run removed) reuses the warm start instead of training another
    client.delete_run(grid[0].info.run_id)
    assert run_ablation(str(spec), overrides) == 0
    kids = runs.children(client, runs.find_parent(client, "ablation", "warm"))
    assert len([r for r in kids if r.data.tags.get("pcl.key") == "warm_start"]) == 1


def test_a_dense_checkpoint_warm_starts_a_dense_run_of_any_optimizer(tiny_cfg):
    """model.pc.* resolves per optimizer (AdamW 4, Muon 2) but shapes only a PC model: not a difference for dense."""
    from pc_lightning.init_from import model_differences

    adamw, muon = tiny_cfg(), tiny_cfg(**{"optim.name": "muon"})
    assert adamw.model.pc.level != muon.model.pc.level
    assert model_differences(adamw.model, muon.model) == []
    pc_adamw, pc_muon = tiny_cfg(**{"model.linear": "pc"}), tiny_cfg(**{"model.linear": "pc", "optim.name": "muon"})
    assert any("pc.level" in d for d in model_differences(pc_adamw.model, pc_muon.model))
    assert any("model.linear" in d for d in model_differences(adamw.model, pc_adamw.model))


def test_a_check_naming_what_the_ablation_lacks_is_refused(tmp_path):
    base = yaml.safe_load((ROOT / "conf" / "ablation" / "claims" / "tsvd.yaml").read_text())
    base["base"] = str(ROOT / "conf" / "baseline.yaml")
    for field_name, value, key in (("variant", "nope", "claim.checks[0].variant"),
                                   ("optimizer", "soap", "claim.checks[0].optimizer"),
                                   ("measure", "gmcn", "claim.checks[0].measure")):
        data = yaml.safe_load(yaml.safe_dump(base))
        data["claim"]["checks"][0][field_name] = value
        path = tmp_path / f"{field_name}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as err:
            load_ablation(path)
        assert err.value.key == key
