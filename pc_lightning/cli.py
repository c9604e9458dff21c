"""``pcl``: the suite's command line.

    pcl train   --config conf/experiment/baseline.yaml [key.path=value ...] [--resume last|CKPT]
    pcl prepare --config ...            prepare (tokenize and cache) the data only
    pcl merge   CKPT [--out DIR]        PC/TSVD checkpoint -> plain dense checkpoint (+ HF Llama export)
    pcl eval    CKPT --tasks t1,t2      lm-evaluation-harness tasks on a checkpoint -> table + JSON results
    pcl sweep   sweeps/NAME.yaml [--workers N] [--storage URL] [--worker-index I]
    pcl ablate  conf/ablation/NAME.yaml [--workers N]
    pcl claims  [NAME ...] [--workers N] positive controls: run conf/ablation/claims/NAME.yaml -> results/claims/
    pcl report  NAME                    re-render an ablation's or study's summary from MLflow/Optuna
"""

from __future__ import annotations

import argparse
import sys
import threading

from pc_lightning.checkpoint_file import CheckpointError
from pc_lightning.config import ConfigError, describe_keys, load_config
from pc_lightning.secrets import redact

OVERRIDES_HELP = (
    "dotted overrides applied after the config file, e.g. optim.lr=1e-3 model.linear=pc data.batch_size=8; "
    "values are parsed as YAML and type-checked"
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True,
                   help="experiment YAML under conf/ (its 'defaults:' list composes presets from conf/)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcl", description="pc-lightning: experiments on stable and efficient LLM pre-training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every run is tracked in MLflow (default sqlite:///results/mlflow.db); "
               "view with: mlflow ui --backend-store-uri sqlite:///results/mlflow.db",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one model and log it to MLflow",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train one model from a typed YAML config; log params, metrics and the "
                                   "resolved config to MLflow; checkpoint to trainer.checkpoint_dir/<name>/<run id>.",
                       epilog="config keys (set in the YAML or as key.path=value):\n" + "\n".join(describe_keys()))
    _add_config_args(p)
    p.add_argument("--resume", metavar="last|CKPT",
                   help="resume from a checkpoint path, or 'last' = newest last.ckpt of this config's name; "
                        "continues the same MLflow run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    p = sub.add_parser("prepare", help="prepare (train tokenizer, tokenize, cache) the configured data only")
    _add_config_args(p)

    p = sub.add_parser("merge", help="merge a PC/TSVD checkpoint into a plain dense model (+ HF export)")
    p.add_argument("checkpoint", help="a checkpoint written by pcl train")
    p.add_argument("--out", help="output directory (default: <checkpoint dir>/merged)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Llama export")

    p = sub.add_parser("eval", help="evaluate a checkpoint on lm-evaluation-harness tasks",
                       description="Score a checkpoint of pcl train or pcl merge (any linear kind) on "
                                   "lm-evaluation-harness tasks with the suite's own model and tokenizer; print the "
                                   "harness's results table and write its JSON results. Needs pip install -e '.[eval]'.")
    p.add_argument("checkpoint", help="a checkpoint written by pcl train (last.ckpt, ...) or pcl merge (merged.ckpt)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated harness task/group names (e.g. hellaswag,arc_easy) or local task names")
    p.add_argument("--limit", type=int, help="at most this many examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--include-path", help="directory of local task YAMLs (the harness's task format)")
    p.add_argument("--out", help="JSON results file (default: <checkpoint dir>/<checkpoint name>.eval.json)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the data cache entry of the checkpoint's "
                                       "data.* config)")

    p = sub.add_parser("sweep", help="run (or resume, or join) an Optuna study declared in YAML")
    p.add_argument("spec", help="sweep file, e.g. sweeps/pc_degree_lr.yaml")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel worker processes on this machine, each with cores // N threads (default 1)")
    p.add_argument("--n-trials", type=int, help="override the file's n_trials")
    p.add_argument("--storage", help="override the file's storage URL (sqlite:///..., postgresql://..., journal path)")
    p.add_argument("--worker-index", type=int, default=0,
                   help="number of this command among those joining one study from several machines or torchrun "
                        "jobs (offsets the sampler seed so that they do not propose the same points)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides applied to the base config of every trial")

    p = sub.add_parser("ablate", help="run a declared grid of variants x optimizers x seeds x LRs -> results/NAME/")
    p.add_argument("spec", help="ablation file, e.g. conf/ablation/quick.yaml")
    p.add_argument("--workers", type=int, default=1,
                   help="runs in parallel, each in a worker process with cores // N threads (default 1)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides applied to the base config of every run")

    p = sub.add_parser("claims", help="run the positive controls (conf/ablation/claims/) -> results/claims/summary.md",
                       description="Run each named claim's ablation (all claims by default; finished runs are kept, "
                                   "so the command resumes), render it to results/claims/NAME/ and write "
                                   "results/claims/summary.md: per claim the paper's claim, the measured paired "
                                   "differences with 95% intervals and a verdict computed by the claim file's rule.")
    p.add_argument("items", nargs="*", metavar="NAME | key.path=value",
                   help="claim names (file stems under conf/ablation/claims/; none = all), and overrides applied to "
                        "every run of them")
    p.add_argument("--seeds", help="comma-separated seeds replacing the files' seeds (e.g. a quick check)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs of each claim in parallel, each in a worker process with cores // N threads (default 1)")
    p.add_argument("--no-run", action="store_true", help="only re-render results/claims/ from MLflow")

    p = sub.add_parser("report", help="re-render an ablation's or study's summary and plots from MLflow/Optuna")
    p.add_argument("name", help="ablation or study name (or its spec file)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///results/mlflow.db)")
    p.add_argument("--storage", help="a study's Optuna storage URL (default: the study's pcl.storage tag, whose "
                                     "password is redacted: PGPASSWORD or ~/.pgpass supply it)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options may also come after the overrides (``pcl sweep SPEC a=1 --storage URL b=2``): argparse ends the
    positional list at the first option, so the overrides it leaves over are appended here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = next((name for name in ("overrides", "items") if hasattr(args, name)), None)
        if target is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, list(getattr(args, target)) + extra)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; a config error or an unusable checkpoint is one ``pcl: ...`` line on stderr, exit code 2."""
    args = parse_args(argv)
    sys.excepthook = print_redacted_traceback
    threading.excepthook = lambda e: print_redacted_traceback(e.exc_type, e.exc_value, e.exc_traceback)
    try:
        return _dispatch(args)
    except (ConfigError, CheckpointError) as e:
        print(f"pcl: {redact(str(e))}", file=sys.stderr)
        return 2


def print_redacted_traceback(exc_type, exc, tb) -> None:
    """An uncaught error's traceback, with passwords in URLs redacted (pc_lightning.secrets)."""
    import traceback

    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            from pc_lightning.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        from pc_lightning.distributed import exit_follower, leave_together
        from pc_lightning.tracked_run import RunStatus
        from pc_lightning.train import train

        result = train(cfg, resume=args.resume)
        code = 3 if result.status == RunStatus.DIVERGED else 0
        if not result.run_id:  # a rank other than 0 of a multi-process run: rank 0 reports
            leave_together()
            exit_follower(code)
        print(f"run {result.run_id}: {result.status} at step {result.step}; "
              f"val/loss={result.metrics.get('val/loss', float('nan')):.4f}; checkpoints in {result.checkpoint_dir}")
        if result.status == RunStatus.DIVERGED:
            print(f"pcl: {result.message}", file=sys.stderr)
        leave_together()
        return code
    if args.command == "prepare":
        from pc_lightning.data.prepare import prepare

        cfg = load_config(args.config, args.overrides)
        prepared = prepare(cfg.data)
        print(f"{'reused' if prepared.cached else 'prepared'} {prepared.dir}")
        for k, v in prepared.meta.items():
            print(f"  {k}: {v}")
        return 0
    if args.command == "merge":
        from pc_lightning.merge import merge_checkpoint

        out = merge_checkpoint(args.checkpoint, args.out, hf_export=not args.no_hf)
        print(f"merged model written to {out}")
        return 0
    if args.command == "eval":
        from pc_lightning.evaluation.downstream import evaluate_checkpoint, results_table

        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval", "needs lm-evaluation-harness: pip install -e '.[eval]'")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ConfigError("--tasks", "name at least one task")
        if args.limit is not None and args.limit < 1:
            raise ConfigError("--limit", "must be >= 1")
        if args.batch_size < 1:
            raise ConfigError("--batch-size", "must be >= 1")
        results, out = evaluate_checkpoint(args.checkpoint, tasks, limit=args.limit, batch_size=args.batch_size,
                                           include_path=args.include_path, out=args.out, device=args.device,
                                           tokenizer=args.tokenizer)
        print(results_table(results))
        print(f"results written to {out}")
        return 0
    if args.command == "sweep":
        from pc_lightning.sweep.study import run_sweep

        return run_sweep(args.spec, workers=args.workers, n_trials=args.n_trials, storage=args.storage,
                         overrides=args.overrides, worker_index=args.worker_index)
    if args.command == "ablate":
        from pc_lightning.sweep.ablation import run_ablation

        return run_ablation(args.spec, overrides=args.overrides, workers=args.workers)
    if args.command == "claims":
        from pc_lightning.sweep.claims import run_claims

        seeds = None
        if args.seeds:
            try:
                seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
            except ValueError:
                raise ConfigError("--seeds", f"expected comma-separated integers, got {args.seeds!r}") from None
        names = [x for x in args.items if "=" not in x]
        overrides = [x for x in args.items if "=" in x]
        return run_claims(names, overrides=overrides, seeds=seeds, run=not args.no_run, workers=args.workers)
    if args.command == "report":
        from pc_lightning.sweep.report import report

        return report(args.name, tracking_uri=args.tracking_uri, storage=args.storage)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
