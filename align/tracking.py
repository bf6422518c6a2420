"""Optional metric sinks besides metrics.jsonl: TensorBoard or Weights & Biases (`report_to`), for
every training stage (`align reward train`, `align ppo`, `align dpo`): the rows metrics.jsonl gets,
at the stage's step (a PPO iteration, an optimiser step of the offline stages), then the summary's
held-out `eval` metrics at the last step. `RunLog` keeps metrics.jsonl and the sink together.

Both are optional (`pip install tensorboard` / `wandb`, or the checkout's extras `".[tensorboard]"`), imported
only when asked for; a missing package is a one-line error before any training starts. A resumed
run continues the same history: TensorBoard drops the events logged at and after the checkpoint's
step (those after it are logged again, as metrics.jsonl's rows are; the checkpoint step's rows are sent
again from metrics.jsonl, so held-out results logged there when the run ended are not shown twice when a
finished run is resumed); W&B continues the run it started (its id is kept in
the run directory) and keeps the values first logged at a step, so the steps after the checkpoint
show the stopped run's values there (the resumed run's are the same up to float rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from align.errors import UserError

ReportTo = Literal["none", "tensorboard", "wandb"]
REPORT_TO_HELP = ("Extra metrics sink besides metrics.jsonl: tensorboard (RUN/tensorboard) or wandb (tensorboard / "
                  "wandb must be installed: pip install tensorboard, or wandb).")
WANDB_PROJECT_HELP = "Weights & Biases project (report_to=wandb); the W&B run is named after the run directory."
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard
WANDB_ID_FILE = "wandb_run_id"  # the W&B run a resumed run continues
# a fresh run into an earlier run's directory (overwrite=true) removes them, so it neither shows the
# earlier events nor continues the earlier W&B run when resumed (W&B's own RUN/wandb, which may hold
# a run logged offline and not yet synced, stays)
TRACKER_OUTPUTS = (TENSORBOARD_DIR, WANDB_ID_FILE)


class NullTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def restore(self, rows: list[dict[str, Any]], step: int) -> None:
        """A resumed run's metrics.jsonl rows at its checkpoint's `step`, for a sink that dropped them."""

    def close(self, failed: bool = False) -> None:
        """`failed`: the run stopped on an error (W&B marks the run failed)."""


class TensorBoardTracker(NullTracker):
    def __init__(self, log_dir: Path, resumed_at: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("report_to=tensorboard needs TensorBoard: pip install tensorboard") from None
        # purge_step: events at or after it, written before the run stopped, are dropped on reading;
        # from the checkpoint's step, whose own rows `restore` writes again
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def restore(self, rows: list[dict[str, Any]], step: int) -> None:
        for row in rows:
            self.log(row, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()  # writes out the queued events


class WandbTracker(NullTracker):
    def __init__(self, project: str, run_dir: Path, config: dict[str, Any], resumed_at: int | None = None):
        try:
            import wandb
        except ImportError:
            raise UserError("report_to=wandb needs Weights & Biases: pip install wandb") from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else None
        try:
            if run_id is None:
                self.run = wandb.init(project=project, dir=str(run_dir), config=config, name=run_dir.name)
            else:  # what --resume may change (RESUME_OVERRIDABLE) updates the run's config, not a conflict
                self.run = wandb.init(project=project, dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow")
                self.run.config.update(config, allow_val_change=True)
        except Exception as exc:  # no API key, no network (wandb's own error types vary by version)
            raise UserError(f"report_to=wandb: W&B could not start the run ({type(exc).__name__}: {exc}); "
                            "log in (wandb login), set WANDB_MODE=offline, or choose another report_to") from None
        id_file.write_text(self.run.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def check_tracker_available(report_to: str) -> None:
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"report_to={report_to} needs {package}: pip install {package}")


def make_tracker(report_to: str, run_dir: Path, project: str, config: dict[str, Any],
                 resumed_at: int | None = None) -> NullTracker:
    """`resumed_at`: the iteration of the checkpoint a resumed run continues from."""
    if report_to == "tensorboard":
        return TensorBoardTracker(run_dir / TENSORBOARD_DIR, resumed_at)
    if report_to == "wandb":
        return WandbTracker(project, run_dir, config, resumed_at)
    return NullTracker()


class RunLog:
    """A run's metric rows, in RUN/metrics.jsonl and the `report_to` sink together (main process).

    Opened once the run directory is started or continued (align.checkpoint.start_run_dir): a resumed
    run first drops the rows after its checkpoint (`resumed_at`, the value of `step_key` there),
    which it writes again, and keeps the earlier ones (`kept`; the sink gets the checkpoint step's
    again where it dropped them). `close` sends the summary's held-out
    metrics (its `eval` keys) to the sink at the last step and closes both; a run that stops on an
    error closes them with `close(failed=True)`, so the sink writes out what it had queued."""

    def __init__(self, run_dir: Path, cfg: Any, *, step_key: str, report_to: str, wandb_project: str,
                 resumed_at: int | None):
        from align.checkpoint import truncate_metrics
        from align.config import config_to_dict
        from align.run import METRICS_FILE, MetricsWriter

        resumed = resumed_at is not None
        self.kept = truncate_metrics(run_dir / METRICS_FILE, step_key, resumed_at) if resumed else []
        self.metrics = MetricsWriter(run_dir / METRICS_FILE, append=resumed)
        try:
            self.tracker = make_tracker(report_to, run_dir, wandb_project, config_to_dict(cfg), resumed_at=resumed_at)
            if resumed:
                self.tracker.restore([row for row in self.kept if row.get(step_key) == resumed_at], resumed_at)
        except BaseException:
            self.metrics.close()
            raise
        self.closed = False

    def log(self, row: dict[str, Any], step: int) -> None:
        self.metrics.write(row)
        self.tracker.log(row, step)

    def close(self, summary: dict[str, Any] | None = None, step: int | None = None, *, failed: bool = False) -> None:
        """Once; `summary` and `step`: the run's summary and last step, when it ended."""
        if self.closed:
            return
        self.closed = True
        try:
            if summary is not None and step is not None:
                self.tracker.log({k: v for k, v in summary.items() if k.startswith("eval")}, step)
            self.tracker.close(failed=failed)
        finally:
            self.metrics.close()
