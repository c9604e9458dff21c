"""Downstream evaluation with lm-evaluation-harness: the adapter's scores, harness metrics on a local task,
the in-loop callback and ``pcl eval``. No network: tasks are local JSON files, and the Hugging Face libraries
are switched offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pc_lightning import tracking  # noqa: E402
from pc_lightning.config import ConfigError, ModelConfig  # noqa: E402
from pc_lightning.data.prepare import prepare  # noqa: E402
from pc_lightning.data.tokenizer import load_tokenizer  # noqa: E402
from pc_lightning.evaluation.downstream import evaluate_tasks, flat_metrics, load_tasks  # noqa: E402
from pc_lightning.evaluation.harness_lm import SuiteLM  # noqa: E402
from pc_lightning.model import Llama  # noqa: E402
from pc_lightning.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# The word every hand-set "always says ' the'" model predicts (one token of the bible BPE).
WORD = " the"


@pytest.fixture()
def offline(monkeypatch):
    """No network for the Hugging Face libraries (their flags are read at import, so set both ways)."""
    import datasets
    import huggingface_hub.constants

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def tokenizer(tiny_cfg):
    return load_tokenizer(str(prepare(tiny_cfg().data).tokenizer_path))


def tiny_model(vocab: int, max_seq_len: int = 32, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=max_seq_len, vocab_size=vocab)
    return Llama(cfg).eval()


@torch.no_grad()
def always_says(token: int, vocab: int) -> Llama:
    """A model whose next-token distribution puts (almost) all mass on ``token`` whatever the input: the blocks
    add nothing (zero out-projections), every embedding is the same vector, and the head reads it into one logit."""
    model = tiny_model(vocab)
    for block in model.blocks:
        block.attn.o.weight.zero_()
        block.mlp.down.weight.zero_()
    model.tok_emb.weight.fill_(1.0)
    model.lm_head.weight.zero_()
    model.lm_head.weight[token] = 1.0  # logit 32 against 0: log p(token) ~ -1e-11, any other ~ -32
    return model


@torch.no_grad()
def direct_loglikelihood(model: Llama, ids: list[int], n_cont: int) -> float:
    """Σ log softmax(model(ids[:-1]))[ids[1:]] over the last ``n_cont`` targets."""
    logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), dim=-1)[0]
    targets = torch.tensor(ids[1:])
    return float(logp[-n_cont:].gather(-1, targets[-n_cont:, None]).sum())


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def write_task(directory: Path, name: str, rows: list[dict]) -> None:
    """A multiple-choice task in the harness's local-file format: JSON lines + a task YAML."""
    data = directory / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")


def toy_tasks(directory: Path) -> Path:
    """pcl_right: the answer is always WORD; pcl_wrong: the answer is never WORD (same questions and choices).

    Choices carry no leading space: the harness puts its ``target_delimiter`` (a space) between context and choice.
    """
    directory.mkdir(parents=True, exist_ok=True)
    others = ["and", "of", "LORD", "said unto"]
    right, wrong = [], []
    for i in range(6):
        choices = [others[i % 4], others[(i + 1) % 4], others[(i + 2) % 4]]
        pos = i % 4
        choices.insert(min(pos, 3), WORD.lstrip())
        at = choices.index(WORD.lstrip())
        question = f"Question {i}: in the beginning God created"
        right.append({"question": question, "choices": choices, "label": at})
        wrong.append({"question": question, "choices": choices, "label": (at + 1 + i % 3) % 4})
    write_task(directory, "pcl_right", right)
    write_task(directory, "pcl_wrong", wrong)
    return directory


# ------------------------------------------------------------------------------------------------- adapter


def test_loglikelihood_matches_direct_computation(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size(), max_seq_len=32)
    lm = SuiteLM(model, tokenizer, batch_size=3)
    long_context = "In the beginning God created the heavens and the earth. " * 6  # > 32 tokens: truncated left
    pairs = [("In the beginning", " God created"), ("", "Amen"), (long_context, " And God said"),
             ("Jesus wept ", "and said"), ("a", " b c d e f g")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    eot = tokenizer.token_to_id("<|endoftext|>")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    assert len(enc(long_context)) > 32
    for (context, cont), (logp, greedy) in zip(pairs, got):
        if context.endswith(" "):  # the harness's convention: the space belongs to the continuation
            context, cont = context[:-1], " " + cont
        ctx_ids, cont_ids = enc(context) or [eot], enc(cont)
        ids = (ctx_ids + cont_ids)[-33:]  # left-truncated to max_seq_len inputs + the last target
        assert logp == pytest.approx(direct_loglikelihood(model, ids, len(cont_ids)), abs=1e-4)
        assert isinstance(greedy, bool)


def test_greedy_flag_and_rolling_loglikelihood(tokenizer):
    vocab = tokenizer.get_vocab_size()
    the = tokenizer.encode(WORD, add_special_tokens=False).ids
    assert len(the) == 1
    lm = SuiteLM(always_says(the[0], vocab), tokenizer, batch_size=2)
    (logp, greedy), (_, not_greedy) = lm.loglikelihood(
        [request("loglikelihood", "And", WORD * 3), request("loglikelihood", "And", " and")])
    assert greedy and not not_greedy and logp == pytest.approx(0.0, abs=1e-6)

    model = tiny_model(vocab, max_seq_len=16)
    lm = SuiteLM(model, tokenizer, batch_size=4)
    short, long = "Jesus wept.", "In the beginning God created the heavens and the earth. " * 4
    tokens = tokenizer.encode(long, add_special_tokens=False).ids
    assert len(tokens) > 3 * 16
    eot = tokenizer.token_to_id("<|endoftext|>")
    stream = [eot] + tokens  # token j of the text is predicted from stream[: j + 1]
    expected, start = 0.0, 0
    while start < len(tokens):  # disjoint windows of 16 predictions, each with the fullest context available
        end = min(start + 16, len(tokens))
        expected += direct_loglikelihood(model, stream[max(0, end - 16) : end + 1], end - start)
        start = end
    short_ids = tokenizer.encode(short, add_special_tokens=False).ids
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", short), request("loglikelihood_rolling", long)])
    assert got[0] == pytest.approx(direct_loglikelihood(model, [eot] + short_ids, len(short_ids)), abs=1e-4)
    assert got[1] == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_stops(tokenizer):
    the = tokenizer.encode(WORD, add_special_tokens=False).ids[0]
    lm = SuiteLM(always_says(the, tokenizer.get_vocab_size()), tokenizer)
    out = lm.generate_until([request("generate_until", "And God said", {"until": ["\n", "e t"], "max_gen_toks": 10}),
                             request("generate_until", "", {"until": [], "max_gen_toks": 4})])
    assert out == [" th", " the the the the"]  # cut before the stop string "e t" of " the the"
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([request("generate_until", "x", {"do_sample": True})])


@pytest.mark.parametrize("linear", [{"model.linear": "pc"}, {"model.linear": "tsvd"}])
def test_pc_and_tsvd_checkpoints_score_as_their_merged_model(tiny_cfg, tmp_path, linear):
    """A PC/TSVD checkpoint and its `pcl merge` output load with the run's tokenizer and give the same scores."""
    import lightning as L

    from pc_lightning.config import to_dict
    from pc_lightning.evaluation.downstream import load_checkpoint_model
    from pc_lightning.merge import merge_module
    from pc_lightning.modules.pretrain import PretrainModule

    cfg = tiny_cfg(**linear)
    cfg.model.vocab_size = prepare(cfg.data).vocab_size
    torch.manual_seed(0)
    module = PretrainModule(to_dict(cfg), total_steps=1)
    with torch.no_grad():  # move the weights off their initialisation so that PC's gains and TSVD's s matter
        for param in module.model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    raw = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, raw)
    merged = merge_module(module, tmp_path / "merged", hf_export=False) / "merged.ckpt"
    pairs = [request("loglikelihood", "In the beginning", " God created"),
             request("loglikelihood", "And he said", " unto them")]
    scores = []
    for path in (raw, merged):
        model, tok, loaded = load_checkpoint_model(path)
        assert loaded.data == cfg.data and not model.training
        scores.append([logp for logp, _ in SuiteLM(model, tok).loglikelihood(pairs)])
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)


# ------------------------------------------------------------------------------------------------- harness


def test_harness_accuracy_of_perfect_and_worst_model(tokenizer, tmp_path, offline):
    tasks = toy_tasks(tmp_path / "tasks")
    the = tokenizer.encode(WORD, add_special_tokens=False).ids[0]
    lm = SuiteLM(always_says(the, tokenizer.get_vocab_size()), tokenizer, batch_size=5)
    task_dict = load_tasks(["pcl_right", "pcl_wrong"], str(tasks))
    results = evaluate_tasks(lm, task_dict)
    continuations = {inst.args[1] for inst in task_dict["tasks"]["pcl_right"].instances}
    assert WORD in continuations and all(c.startswith(" ") and not c.startswith("  ") for c in continuations)
    metrics = flat_metrics(results)
    assert metrics["eval/pcl_right/acc"] == 1.0 and metrics["eval/pcl_right/acc_norm"] == 1.0
    assert metrics["eval/pcl_wrong/acc"] == 0.0 and metrics["eval/pcl_wrong/acc_norm"] == 0.0
    limited = flat_metrics(evaluate_tasks(lm, load_tasks(["pcl_right"], str(tasks)), limit=2))
    assert limited == {"eval/pcl_right/acc": 1.0, "eval/pcl_right/acc_norm": 1.0}


@pytest.mark.slow  # a name not found locally makes the harness index its own ~15k task YAMLs (10-40 s)
def test_unknown_task_is_a_config_error(tmp_path, offline):
    tasks = toy_tasks(tmp_path / "tasks")
    with pytest.raises(ConfigError, match="monitor.eval_tasks") as e:
        load_tasks(["pcl_right", "no_such_task_xyz"], str(tasks), key="monitor.eval_tasks")
    assert "no_such_task_xyz" in str(e.value)
    with pytest.raises(ConfigError, match="monitor.eval_include_path"):
        load_tasks(["pcl_right"], str(tmp_path / "missing"), include_key="monitor.eval_include_path")


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, key", [
    ({"monitor.eval_every": 0}, "monitor.eval_every"),
    ({"monitor.eval_limit": 0}, "monitor.eval_limit"),
    ({"monitor.eval_tasks": "[a, a]"}, "monitor.eval_tasks"),
    ({"monitor.eval_tasks": "['']"}, "monitor.eval_tasks"),
    ({"monitor.eval_include_path": "/no/such/dir"}, "monitor.eval_include_path"),
    ({"monitor.eval_tasks": "[a]", "trainer.strategy": "fsdp"}, "monitor.eval_tasks"),
])
def test_eval_keys_are_validated(tiny_cfg, override, key):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(**override)
    assert e.value.key == key


def test_off_by_default_imports_nothing(tiny_cfg):
    """Without monitor.eval_tasks there is no callback and lm_eval is never imported."""
    code = ("import sys; from pc_lightning.config import load_config; "
            "from pc_lightning.callbacks.registry import configured_callbacks; "
            "from pc_lightning.modules.pretrain import PretrainModule; import pc_lightning.train; "
            f"cfg = load_config({str(ROOT / 'conf' / 'baseline.yaml')!r}, ['model.vocab_size=512']); "
            "cbs = configured_callbacks(cfg, PretrainModule(__import__('dataclasses').asdict(cfg), 10)); "
            "assert not any(type(c).__name__ == 'DownstreamEval' for c in cbs), cbs; "
            "assert 'lm_eval' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_in_loop_eval_and_pcl_eval(tiny_cfg, tmp_path, offline):
    """A tiny PC run logs eval/<task>/<metric> at steps 3 and 6 and trains exactly as without the evaluation;
    ``pcl eval`` of its checkpoint (a separate, offline process) reproduces the last in-loop numbers, prints the
    table and writes the JSON results."""
    tasks = toy_tasks(tmp_path / "tasks")
    cfg = tiny_cfg(name="evalrun", **{"model.linear": "pc", "monitor.eval_tasks": "[pcl_right, pcl_wrong]",
                                      "monitor.eval_every": 3, "monitor.eval_include_path": str(tasks)})
    result = train(cfg, quiet=True)
    assert result.status == "finished" and result.step == 6
    plain = train(tiny_cfg(name="plain", **{"model.linear": "pc"}), quiet=True)
    weights = [torch.load(Path(r.checkpoint_dir) / "last.ckpt", weights_only=False)["state_dict"]
               for r in (result, plain)]
    for key, value in weights[1].items():
        assert torch.equal(weights[0][key], value), key
    client = MlflowClient(tracking.tracking_uri(tracking.TrackingConfig()))
    for name in ("eval/pcl_right/acc", "eval/pcl_right/acc_norm", "eval/pcl_wrong/acc"):
        history = client.get_metric_history(result.run_id, name)
        assert [m.step for m in history] == [3, 6], name
        assert all(0.0 <= m.value <= 1.0 for m in history)
    assert "val/bpb" in client.get_run(result.run_id).data.metrics
    last = {name: client.get_metric_history(result.run_id, name)[-1].value
            for name in ("eval/pcl_right/acc", "eval/pcl_wrong/acc")}

    ckpt = Path(result.checkpoint_dir) / "last.ckpt"
    out = subprocess.run([sys.executable, "-m", "pc_lightning.cli", "eval", str(ckpt), "--tasks",
                          "pcl_right,pcl_wrong", "--include-path", str(tasks), "--batch-size", "4",
                          "--device", "cpu"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)},
                         cwd=str(ROOT))  # data.cache_dir of the run is absolute (the test's data cache)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "pcl_right" in out.stdout and "acc_norm" in out.stdout
    saved = json.loads((ckpt.parent / "last.eval.json").read_text())
    for name, value in last.items():
        task = name.split("/")[1]
        assert saved["results"][task]["acc,none"] == pytest.approx(value)
        assert saved["pcl"]["metrics"][name] == pytest.approx(value)


def test_pcl_eval_refuses_unknown_checkpoint(tmp_path, capsys):
    from pc_lightning.cli import main

    assert main(["eval", str(tmp_path / "none.ckpt"), "--tasks", "x"]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err


@pytest.mark.slow
def test_in_loop_eval_under_ddp_runs_on_rank_zero(data_cache, results_dir, tmp_path):
    """`torchrun --nproc_per_node 2 pcl train` of a PC model with in-loop evaluation: rank 0 evaluates while rank
    1 waits, one MLflow run gets eval/<task>/<metric> at steps 2 and 4, and val/bpb."""
    from test_distributed import ddp_overrides, mlflow_runs, torchrun

    prepare(tiny_cfg_data(data_cache))  # the ranks only read the cache
    tasks = toy_tasks(tmp_path / "tasks")
    torchrun(results_dir, "-m", "pc_lightning.cli", "train", "--config", str(ROOT / "conf" / "baseline.yaml"),
             *ddp_overrides(data_cache, results_dir, name="pc-eval", **{
                 "model.linear": "pc", "monitor.eval_tasks": "[pcl_right]", "monitor.eval_every": 2,
                 "monitor.eval_limit": 4, "monitor.eval_include_path": str(tasks)}))
    (run,) = mlflow_runs(results_dir, "pc-eval")
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{(results_dir / 'mlflow.db').resolve()}")
    history = client.get_metric_history(run.info.run_id, "eval/pcl_right/acc")
    assert [m.step for m in history] == [2, 4] and all(m.value in (0.0, 0.25, 0.5, 0.75, 1.0) for m in history)
    assert 0 < run.data.metrics["val/bpb"] < 20


def tiny_cfg_data(data_cache: str):
    from conftest import tiny_overrides
    from pc_lightning.config import load_config

    return load_config(ROOT / "conf" / "baseline.yaml", tiny_overrides(data_cache, Path("unused"))).data


def test_ablation_summary_has_a_table_per_eval_metric(data_cache, results_dir, tmp_path, offline):
    """An ablation whose runs evaluate in the loop gets one metrics table per ``eval/<task>/<metric>`` in its
    summary (no ``metrics:`` section needed), with the value over seeds; stderrs are not tables."""
    import yaml

    from conftest import tiny_overrides
    from pc_lightning.sweep.ablation import run_ablation

    tasks = toy_tasks(tmp_path / "tasks")
    spec = {"name": "with-eval", "base": str(ROOT / "conf" / "baseline.yaml"),
            "overrides": tiny_overrides(data_cache, results_dir, **{
                "trainer.max_steps": 2, "trainer.val_every": 2, "monitor.eval_tasks": "[pcl_right]",
                "monitor.eval_every": 2, "monitor.eval_include_path": str(tasks)}),
            "variants": {"baseline": []}, "optimizers": {"adamw": []}, "seeds": [1, 2]}
    path = tmp_path / "with-eval.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert run_ablation(str(path)) == 0
    summary = (results_dir / "with-eval" / "summary.md").read_text()
    for name in ("eval/pcl_right/acc", "eval/pcl_right/acc_norm"):
        assert f"### `{name}`: `{name}`, last" in summary, name
    assert "acc_stderr`" not in summary
    row = next(line for line in summary.splitlines() if line.startswith("| baseline | adamw | 2 |"))
    assert "±" in row
