"""Multi-process training (DDP, FSDP) of dense, PC and TSVD models on 2 CPU processes with gloo.

The ranks run tests/distributed_worker.py under torchrun (``python -m torch.distributed.run --standalone``). Each
rank reads ``data.batch_size`` windows per step, and the data module gives rank r the global sample indices
``start + j·world + r``, so 2 ranks × batch 4 see exactly the windows of 1 process × batch 8, and DDP/FSDP average
the two ranks' mean losses into that batch's mean: after the same steps the parameters must agree.

Overrides shared by every comparison: ``optim.warmup_fraction=0`` (a first step at lr 0 would hide any gradient
difference) and ``optim.eps=1e-3``. Adam's first step is about lr·sign(g); with eps = 1e-8 a round-off difference
of 1e-10 in a near-zero gradient entry can move that weight by up to lr, so the comparison would test round-off,
not the distributed logic. With eps = 1e-3 the update is a smooth function of the gradient.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pc_lightning.config import ConfigError, load_config
from pc_lightning.data.prepare import prepare
from pc_lightning.distributed import lightning_strategy, pc_evaluation
from pc_lightning.modules.pretrain import PretrainModule

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 240  # a hung collective fails the test instead of the suite
DROPPED_RTOL = 1e-3  # the lookahead's line-search step is good to a few 1e-4 relative (split_dropped)


def tiny(data_cache: str, **extra) -> list[str]:
    items = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 64, "model.max_seq_len": 64,
        "data.vocab_size": 512, "data.seq_len": 32, "data.val_batches": 2, "data.cache_dir": data_cache,
        "trainer.max_steps": 3, "trainer.progress_bar": False, "optim.warmup_fraction": 0, "optim.eps": 1e-3,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def prepared_cache(data_cache) -> str:
    """Prepare the data once here, so that the ranks only read the cache (no two processes write it)."""
    prepare(load_config(ROOT / "conf" / "baseline.yaml", tiny(data_cache)).data)
    return data_cache


def launch(out: Path, nproc: int, overrides: list[str]) -> list[dict]:
    """Run the worker on ``nproc`` processes under torchrun; returns each rank's record (parameters, losses, TSVD
    ranks). A single-process run goes through :func:`fit_in_process`."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           "fit", "--out", str(out), *overrides, f"trainer.devices={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


def fit_in_process(out: Path, overrides: list[str]) -> dict:
    """The worker's ``fit`` on 1 process, in this one (with one thread, as each rank has; the test's thread count is
    restored after); returns its record."""
    from distributed_worker import fit_run

    out.mkdir(parents=True)
    threads = torch.get_num_threads()
    try:
        fit_run(str(out), [*overrides, "trainer.devices=1"])
    finally:
        torch.set_num_threads(threads)
    return torch.load(out / "rank0.pt")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def assert_same_on_every_rank(ranks: list[dict]) -> None:
    for other in ranks[1:]:
        assert other["params"].keys() == ranks[0]["params"].keys()
        for key, value in ranks[0]["params"].items():
            assert torch.equal(value, other["params"][key]), f"{key} differs between ranks"


def split_dropped(params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(everything else, the TSVD layers' ``dropped`` buffers): the rank rule's record of the singular values it
    left out, which carry the line-search step of its lookahead and are compared with a relative tolerance.

    That step is the vertex of a parabola through three fp32 losses (``lookahead_probe.line_search``): losses of
    ~6 nats carry round-off of ~1e-6, which differs between one process and the mean of two ranks, while the loss
    differences the vertex is taken from are ~1e-3, so the step, and every lookahead value it scales, is only good
    to a few 1e-4 relative (measured: up to 2.3e-4 between the two runs on one machine, < 1e-4 on another)."""
    dropped = {k: v for k, v in params.items() if k.endswith(".dropped")}
    return {k: v for k, v in params.items() if k not in dropped}, dropped


def assert_matches_one_process(ranks: list[dict], single: dict, atol: float = 1e-6) -> None:
    (mine, mine_dropped), (theirs, theirs_dropped) = split_dropped(ranks[0]["params"]), split_dropped(single["params"])
    assert max_difference(mine, theirs) <= atol
    assert mine_dropped.keys() == theirs_dropped.keys()
    for key, value in mine_dropped.items():
        torch.testing.assert_close(value, theirs_dropped[key], rtol=DROPPED_RTOL, atol=atol, msg=key)
    # the global batch's loss is the mean of the ranks' losses over equal-sized shards
    mean_losses = [sum(r["losses"][i] for r in ranks) / len(ranks) for i in range(len(single["losses"]))]
    assert all(math.isfinite(x) for x in mean_losses)
    assert mean_losses == pytest.approx(single["losses"], abs=1e-5)


CASES = {
    # name: (overrides of both runs, overrides of the two-rank run only)
    "dense-ddp": ({}, {"trainer.strategy": "ddp"}),
    "pc-ddp": ({"model.linear": "pc"}, {"trainer.strategy": "ddp"}),
    "pc-ddp-accumulate": ({"model.linear": "pc"},
                          {"trainer.strategy": "ddp", "trainer.accumulate_grad_batches": 2, "data.batch_size": 2}),
    "dense-fsdp": ({}, {"trainer.strategy": "fsdp"}),
    "pc-fsdp": ({"model.linear": "pc"}, {"trainer.strategy": "fsdp"}),
    "tsvd-fsdp": ({"model.linear": "tsvd", "model.tsvd.rank_check_every": 0}, {"trainer.strategy": "fsdp"}),
    "tsvd-ddp-rank-change": ({"model.linear": "tsvd", "model.tsvd.rank_check_every": 2,
                              "model.tsvd.energy_threshold": 0.5, "trainer.max_steps": 4}, {"trainer.strategy": "ddp"}),
}


_SINGLE: dict[tuple, dict] = {}


def single_process_reference(both: dict, data_cache: str, tmp_path: Path) -> dict:
    """The 1-process × batch 8 run for the overrides ``both`` (:func:`fit_in_process`), once per distinct ``both``
    per pytest process (the DDP and FSDP cases of a layer kind compare with the same run)."""
    key = tuple(sorted((k, str(v)) for k, v in both.items()))
    if key not in _SINGLE:
        _SINGLE[key] = fit_in_process(tmp_path / "single", tiny(data_cache, **both, **{"data.batch_size": 8}))
    return _SINGLE[key]


@pytest.mark.parametrize("case", [pytest.param("pc-ddp")] + [
    pytest.param(name, marks=pytest.mark.slow) for name in CASES if name != "pc-ddp"])
def test_two_ranks_match_one_process(case, prepared_cache, tmp_path):
    """2 ranks × batch 4 end with the parameters of 1 process × batch 8 (≤ 1e-6), identical on both ranks.

    PC under DDP uses PCStep (W_eff once per step, its gradient all-reduced by PCStep, raw weights hidden from
    DDP), also with gradient accumulation; PC under FSDP computes W_eff in each layer's forward and is compared
    with the single-process PCStep run. The TSVD case shrinks every layer's rank at step 2 and 4.
    """
    both, multi = CASES[case]
    single = single_process_reference(both, prepared_cache, tmp_path)
    ranks = launch(tmp_path / "multi", 2, tiny(prepared_cache, **both, **{"data.batch_size": 4, **multi}))
    assert ranks[0]["strategy"] == ("DDPStrategy" if multi["trainer.strategy"] == "ddp" else "CPUFSDPStrategy")
    assert_same_on_every_rank(ranks)
    if multi.get("trainer.accumulate_grad_batches", 1) > 1:  # per-micro-batch losses: compare parameters only
        assert max_difference(*(split_dropped(r["params"])[0] for r in (ranks[0], single))) <= 1e-6
    else:
        assert_matches_one_process(ranks, single)
    if case == "tsvd-ddp-rank-change":
        trajectory = [r["model.blocks.0.attn.q"] for r in ranks[0]["ranks"]]
        # rank 0.5·32 at init, halved (max_shrink_fraction) at step 2; at step 4 the rule, which remembers the
        # values it dropped, takes it to where τ = 0.5 of the whole spectrum lies
        assert trajectory == [r["model.blocks.0.attn.q"] for r in single["ranks"]]
        assert trajectory[:3] == [16, 8, 8] and 4 <= trajectory[3] < 8


@pytest.mark.slow
def test_tsvd_rank_growth_under_ddp_keeps_ranks_identical(prepared_cache, tmp_path):
    """Layers grown by the lookahead get new directions (computed on every rank from the averaged gradients);
    after the DDP wrapper is rebuilt (which broadcasts rank 0's parameters and buffers) both ranks hold identical
    parameters and ranks, and training goes on with finite losses."""
    ranks = launch(tmp_path / "multi", 2, tiny(prepared_cache, **{
        "model.linear": "tsvd", "model.tsvd.rank_check_every": 2, "model.tsvd.energy_threshold": 1.0,
        "trainer.max_steps": 4, "data.batch_size": 4, "trainer.strategy": "ddp"}))
    assert ranks[0]["ranks"] == ranks[1]["ranks"]
    before, after = ranks[0]["ranks"][0], ranks[0]["ranks"][1]
    assert any(after[name] > before[name] for name in before)  # the lookahead grew layers at step 2 (attn.o, v)
    assert all(math.isfinite(x) for r in ranks for x in r["losses"])
    assert_same_on_every_rank(ranks)


def test_pc_forward_mode_equals_step_mode(prepared_cache, tmp_path):
    """The FSDP path (W_eff and power iteration in each forward, no PCStep) trains exactly like PCStep, 1 process."""
    runs = {mode: fit_in_process(tmp_path / mode, tiny(prepared_cache, **{
        "model.linear": "pc", "model.pc.evaluate": mode, "data.batch_size": 4})) for mode in ("step", "forward")}
    assert max_difference(runs["step"]["params"], runs["forward"]["params"]) <= 1e-6
    assert runs["step"]["losses"] == pytest.approx(runs["forward"]["losses"], abs=1e-6)


def test_strategy_and_pc_mode_follow_the_config(tiny_cfg):
    from lightning.pytorch.strategies import FSDPStrategy

    from pc_lightning.model.llama import Block

    assert lightning_strategy(tiny_cfg()) == "auto"
    ddp = tiny_cfg(**{"model.linear": "pc", "trainer.strategy": "ddp"})
    assert lightning_strategy(ddp) == "ddp" and pc_evaluation(ddp) == "step"
    fsdp = tiny_cfg(**{"model.linear": "pc", "trainer.strategy": "fsdp"})
    strategy = lightning_strategy(fsdp)
    assert isinstance(strategy, FSDPStrategy) and pc_evaluation(fsdp) == "forward"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert pc_evaluation(tiny_cfg(**{"model.linear": "pc", "model.pc.evaluate": "forward"})) == "forward"


@pytest.mark.parametrize("overrides, key", [
    ({"model.linear": "pc", "model.pc.evaluate": "step"}, "model.pc.evaluate"),
    ({"model.linear": "pc", "model.pc.merge_on_end": True}, "model.pc.merge_on_end"),
    ({"model.linear": "tsvd", "model.tsvd.rank_check_every": 10}, "model.tsvd.rank_check_every"),
    ({"optim.name": "muon"}, "optim.name"),
    ({"monitor.grad_norms": True}, "monitor.grad_norms"),
    ({"monitor.spike.enabled": True}, "monitor.spike.enabled"),
])
def test_fsdp_refuses_what_needs_whole_matrices(tiny_cfg, overrides, key):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(**{"trainer.strategy": "fsdp", **overrides})
    assert err.value.key == key
    tiny_cfg(**{"trainer.strategy": "ddp", **overrides})  # fine under DDP


def torchrun(results_dir: Path, *args: str) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS``, MLflow and checkpoints in results_dir."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PCL_RESULTS_DIR": str(results_dir)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def mlflow_runs(results_dir: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(results_dir / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("pc-lightning")
    return client.search_runs([experiment.experiment_id], f"tags.`pcl.name` = '{name}'")


def last_checkpoint(results_dir: Path, name: str) -> dict:
    (path,) = (results_dir / "checkpoints" / name).glob("*/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def ddp_overrides(data_cache: str, results_dir: Path, **extra) -> list[str]:
    from conftest import tiny_overrides

    return tiny_overrides(data_cache, results_dir, **{
        "trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 4,
        "trainer.checkpoint_every": 2, "trainer.val_every": 2, **extra})


TSVD_RANK_CHANGES = {"model.linear": "tsvd", "model.tsvd.rank_check_every": 2, "model.tsvd.energy_threshold": 0.5}


@pytest.mark.slow
def test_pcl_train_under_torchrun_ddp_tracks_one_run(prepared_cache, results_dir):
    """`torchrun --nproc_per_node 2 -m pc_lightning.cli train` of a PC model: one MLflow run, FINISHED."""
    torchrun(results_dir, "-m", "pc_lightning.cli", "train", "--config", str(ROOT / "conf" / "baseline.yaml"),
             *ddp_overrides(prepared_cache, results_dir, name="pc", **{"model.linear": "pc"}))
    (run,) = mlflow_runs(results_dir, "pc")
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert math.isfinite(run.data.metrics["train/loss"]) and math.isfinite(run.data.metrics["val/loss"])
    assert last_checkpoint(results_dir, "pc")["global_step"] == 4


@pytest.mark.slow
def test_resume_across_a_rank_change_under_ddp(prepared_cache, results_dir):
    """TSVD on 2 ranks, ranks changing at steps 2 and 4: a run interrupted after step 2 (pc_lightning.train.train
    with StopAt, as in tests/test_train.py; its checkpoint is written after the rank change) resumes with
    ``--resume last``, continues its one MLflow run, and ends where the uninterrupted `pcl train` run ends."""
    torchrun(results_dir, "-m", "pc_lightning.cli", "train", "--config", str(ROOT / "conf" / "baseline.yaml"),
             *ddp_overrides(prepared_cache, results_dir, name="straight", **TSVD_RANK_CHANGES))
    straight = last_checkpoint(results_dir, "straight")
    split = ddp_overrides(prepared_cache, results_dir, name="split", **TSVD_RANK_CHANGES)
    torchrun(results_dir, str(WORKER), "train", "--stop-at", "2", *split)
    interrupted = last_checkpoint(results_dir, "split")
    assert interrupted["global_step"] == 2 and interrupted["state_dict"]["model.blocks.0.attn.q.s"].shape == (8,)
    torchrun(results_dir, str(WORKER), "train", "--resume", "last", *split)
    (run,) = mlflow_runs(results_dir, "split")
    assert run.info.status == "FINISHED"
    resumed = last_checkpoint(results_dir, "split")
    assert resumed["global_step"] == straight["global_step"] == 4
    assert resumed["state_dict"]["model.blocks.0.attn.q.s"].shape[0] < 8  # changed again at step 4
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("linear", [{"model.linear": "pc"}, {"model.linear": "tsvd", "model.tsvd.rank_check_every": 0}],
                         ids=["pc", "tsvd"])
def test_resume_under_fsdp_matches_uninterrupted_run(prepared_cache, results_dir, linear):
    """FSDP on 2 ranks: ``last.ckpt`` holds the full (gathered) model and optimizer state, and a run stopped after
    step 2 and resumed with ``--resume last`` ends exactly where the uninterrupted run ends. Runs through
    distributed_worker.cpu_fsdp_checkpoints (FSDP on CPU, Lightning's gather without its GPU-only CPU offload)."""
    runs = {name: ddp_overrides(prepared_cache, results_dir, name=name, **{"trainer.strategy": "fsdp", **linear})
            for name in ("straight", "split")}
    torchrun(results_dir, str(WORKER), "train", *runs["straight"])
    torchrun(results_dir, str(WORKER), "train", "--stop-at", "2", *runs["split"])
    interrupted = last_checkpoint(results_dir, "split")
    assert interrupted["global_step"] == 2
    adam = interrupted["optimizer_states"][0]["state"]  # one entry per parameter, gathered from the shards
    assert len(adam) == len(list(PretrainModule(**interrupted["hyper_parameters"]).parameters()))
    assert all(entry["exp_avg"].ndim >= 1 and entry["step"] == 2 for entry in adam.values())
    torchrun(results_dir, str(WORKER), "train", "--resume", "last", *runs["split"])
    (run,) = mlflow_runs(results_dir, "split")
    assert run.info.status == "FINISHED"
    straight, resumed = last_checkpoint(results_dir, "straight"), last_checkpoint(results_dir, "split")
    assert resumed["global_step"] == straight["global_step"] == 4
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6)
