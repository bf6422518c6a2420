"""Optional metric sinks besides metrics.jsonl: TensorBoard or Weights & Biases (`report_to`).

Both are optional extras (`pip install 'align[tensorboard]'` / `'align[wandb]'`), imported
only when asked for; a missing package is a one-line error before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.errors import UserError


class NullTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NullTracker):
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("report_to=tensorboard needs TensorBoard: pip install 'align[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(NullTracker):
    def __init__(self, project: str, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError("report_to=wandb needs Weights & Biases: pip install 'align[wandb]'") from None
        self.run = wandb.init(project=project, dir=str(run_dir), config=config, name=run_dir.name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def check_tracker_available(report_to: str) -> None:
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"report_to={report_to} needs {package}: pip install 'align[{package}]'")


def make_tracker(report_to: str, run_dir: Path, project: str, config: dict[str, Any]) -> NullTracker:
    if report_to == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard")
    if report_to == "wandb":
        return WandbTracker(project, run_dir, config)
    return NullTracker()
