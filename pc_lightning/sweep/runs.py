"""MLflow parent and child runs for studies and ablations.

One parent run per study or ablation, found by its tags (``pcl.kind`` = study|ablation, ``pcl.name``),
so a re-run of the same command, or another worker, reuses it. Every trial or ablation run is a child
run: the training run with the ``mlflow.parentRunId`` tag (``tracking.parent_run_id``). A parent's life (open
while the command runs, then finished, killed or failed) is a :class:`~pc_lightning.tracked_run.TrackedRun`.
"""

from __future__ import annotations

from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from pc_lightning.tracked_run import RunStatus, TrackedRun


def _all_experiments(mlflow_client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in mlflow_client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def find_parent(mlflow_client: MlflowClient, kind: str, name: str) -> Run | None:
    """The oldest parent run of this kind and name in any experiment (oldest wins if two workers raced)."""
    runs = mlflow_client.search_runs(
        _all_experiments(mlflow_client),
        filter_string=f"tags.`pcl.kind` = '{kind}' AND tags.`pcl.name` = '{name}'",
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def find_or_create_parent(mlflow_client: MlflowClient, uri: str, experiment: str, kind: str, name: str,
                          tags: dict[str, str]) -> TrackedRun:
    """The parent run; created (RUNNING) if none exists, reopened to RUNNING otherwise."""
    existing = find_parent(mlflow_client, kind, name)
    if existing is None:
        run = TrackedRun.create(mlflow_client, uri, experiment, f"{kind}-{name}",
                                {"pcl.kind": kind, "pcl.name": name, **tags})
        winner = find_parent(mlflow_client, kind, name)
        if winner is None or winner.info.run_id == run.run_id:
            return run
        mlflow_client.delete_run(run.run_id)  # another worker created one first
        existing = winner
    parent = TrackedRun.reopen(mlflow_client, existing.info.run_id)
    for key, value in tags.items():
        mlflow_client.set_tag(parent.run_id, key, value)
    return parent


def children(mlflow_client: MlflowClient, parent: Run) -> list[Run]:
    """Child runs of a parent, oldest first (in any experiment: a variant may set tracking.experiment)."""
    return mlflow_client.search_runs(
        _all_experiments(mlflow_client),
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )


def close_orphaned_children(mlflow_client: MlflowClient, parent_id: str, status: RunStatus, why: str) -> int:
    """Close the parent's child runs that are still RUNNING once no process can close them any more (every worker
    of a parallel ablation has exited): a worker stopped between opening its run and entering it, or died.
    Returns how many were closed."""
    orphans = [r for r in children(mlflow_client, mlflow_client.get_run(parent_id)) if r.info.status == "RUNNING"]
    for run in orphans:
        TrackedRun(mlflow_client, run.info.run_id).close(status, error=why)
    return len(orphans)
