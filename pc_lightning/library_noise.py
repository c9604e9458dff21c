"""Console lines of the suite's libraries that a user cannot act on, silenced once per process.

Before, every training run of an ablation printed them again (lightning 2.6, torch 2.13, MLflow 3):

* Lightning's device banner ("GPU available: False, used: False", "TPU available: ...") and its promotional
  tips ("💡 Tip: ... litlogger" / "litmodels"). Lightning has no switch for either (``_log_device_info`` in
  ``trainer/setup.py`` and the logger connector call ``rank_zero_info`` unconditionally), so a filter on its
  rank-zero loggers drops exactly these messages, and "`Trainer.fit` stopped: `max_steps=N` reached" (the suite
  reports how every run ended itself), and "`Trainer(val_check_interval=1)` was configured so validation will
  run after every batch" (and its twins for ``limit_*_batches=1``), which restate in Lightning's argument names
  what the run's own keys (``trainer.val_every``, ``data.val_batches``) say. Lightning's other notices (a
  checkpoint restored, a run stopped early for another reason) are kept.
* torch's FutureWarning that ``LeafSpec`` is deprecated, raised by Lightning's own use of torch's pytree.
* MLflow's INFO lines "Creating initial MLflow database tables..." / "Updating database tables" when it
  creates or migrates a SQLite store.

Errors, and warnings that concern the run's own settings, still reach the console.
"""

from __future__ import annotations

import logging
import warnings

# Messages of Lightning's rank-zero loggers that are dropped, by how they start.
LIGHTNING_NOISE = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:",
                   "`Trainer.fit` stopped: `max_steps=")
# lightning_utilities' rank_zero_info writes to whichever of these was imported last
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
MLFLOW_SCHEMA_LOGGER = "mlflow.store.db.utils"
# "`Trainer(<argument>=1)` was configured so ...": Lightning restating an argument the suite set
LIGHTNING_ARGUMENT_ECHO = " was configured so "

_silenced = False


def _not_noise(record: logging.LogRecord) -> bool:
    message = str(record.msg).lstrip()
    return not (message.startswith(LIGHTNING_NOISE)
                or (message.startswith("`Trainer(") and LIGHTNING_ARGUMENT_ECHO in message))


def silence_library_noise() -> None:
    """Install the filters above (idempotent; called where the suite first builds a Trainer or an MLflow client)."""
    global _silenced
    if _silenced:
        return
    _silenced = True
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(_not_noise)
    logging.getLogger(MLFLOW_SCHEMA_LOGGER).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
