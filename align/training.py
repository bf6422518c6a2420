"""The step loop of the offline stages (`align reward train`, `align dpo`).

Both train on examples known before training starts: global batches planned up front from the seed
(align.distributed.global_batches), each step one optimiser step over a global batch that the ranks
split, metrics rows averaged over a window of steps and over the ranks, a checkpoint every
`save_every` steps that closes the window, so a resumed run writes the rows of an uninterrupted one.
The rows go to RUN/metrics.jsonl and to the `report_to` sink (align.tracking).

A stage's trainer subclasses `StepLoop`, defines `local_batches` and `step` (its own forward and
backward, counting `responses_forwarded`) and sets in its setup the attributes listed on the class.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from align.checkpoint import (
    check_same_run,
    data_fingerprint,
    load_training_state,
    release_run_dir,
    resumed_line,
    save_training_state,
    start_run_dir,
)
from align.config import config_to_dict
from align.distributed import clip_and_check_gradients, global_batches
from align.provenance import model_fingerprints
from align.run import TrainingClock

if TYPE_CHECKING:
    from align.tracking import RunLog

CHECKPOINT_PREFIX = "step"  # RUN/checkpoints/step-NNNNNN


class StepLoop:
    """What the offline stages share. Set by the stage's setup: `cfg` (its config), `loop_cfg` (the
    part holding batch_size, epochs, max_steps, seed, log_every, save_every, keep_checkpoints,
    progress, report_to, wandb_project), `accelerator`, `device`, `rank`,
    `world`, `is_main`, `fsdp` (the FSDP plugin or None), `run_dir`, `t0` (when the process began), `model`
    (the stage's module), `wrapped_model` (what the training step calls: it under DDP, itself under FSDP2),
    `optimizer`, `scheduler`, `trainable` (the parameters trained), `train_set` (its `items` fingerprint the
    data), `model_paths` (config key -> the model directory it named, fingerprinted likewise),
    `global_batches`, `echo`; the main process ends its setup with `open_logs` and its finish
    with `run_log.close(summary, step_count)`."""

    stage: str  # "reward", "dpo": the prefix of the stage's lines
    resume_overridable: frozenset[str] | set[str]  # config keys a resumed run may change
    batch_items = "examples"  # what a global batch holds, for the message when there are too few

    step_count: int = 0
    responses_forwarded: int = 0  # by this rank's training steps
    run_log: RunLog | None = None  # the main process's, once `open_logs` has opened it

    @functools.cached_property
    def clock(self) -> TrainingClock:
        return TrainingClock()

    def run(self) -> dict[str, Any]:
        """setup, train, finish: the run from start to summary (empty on other ranks); its folder is
        let go however the run ends (align.checkpoint.hold_run_dir)."""
        try:
            self.setup()
            self.train()
            return self.finish()
        except BaseException:
            if self.run_log is not None:
                self.run_log.close(failed=True)
            raise
        finally:
            release_run_dir(Path(self.cfg.output_dir))

    def local_batches(self, global_batch: list[int]) -> Any:
        """This rank's part of a global batch, in micro-batches, as `step` takes it."""
        raise NotImplementedError

    def step(self, local: Any) -> dict[str, float]:
        """One optimiser step (ending in `optimizer_step`); its metrics."""
        raise NotImplementedError

    def plan_batches(self) -> list[list[int]]:
        """Global batches of example indices (align.distributed.global_batches)."""
        c = self.loop_cfg
        return global_batches(len(self.train_set), c.batch_size, epochs=c.epochs, max_steps=c.max_steps, seed=c.seed,
                              world=self.world, what=self.batch_items)

    def optimizer_step(self, max_grad_norm: float) -> float:
        """Clip the accumulated gradients, refuse a non-finite norm (a NaN model is never trained on,
        nor saved), step AdamW and the schedule; the gradient norm before clipping."""
        grad_norm = clip_and_check_gradients(self.accelerator, self.trainable, max_grad_norm, sharded=bool(self.fsdp),
                                             where=f"step {self.step_count + 1}")
        self.optimizer.step()
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step took
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def train(self) -> None:
        from tqdm.auto import tqdm

        c = self.loop_cfg
        total = len(self.global_batches)
        self.clock.start()
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        bar = tqdm(self.global_batches[self.step_count:], initial=self.step_count, total=total, desc=self.stage,
                   unit="step", disable=not (c.progress and self.is_main))
        for global_batch in bar:
            window.append(self.step(self.local_batches(global_batch)))
            self.step_count += 1
            # a checkpoint closes the metrics window too, so a resumed run writes the rows of an uninterrupted one
            checkpoint = bool(c.save_every) and self.step_count % c.save_every == 0
            if self.step_count % c.log_every == 0 or self.step_count == total or checkpoint:
                keys = list(window[0])
                local = torch.tensor([sum(m[k] for m in window) / len(window) for k in keys], device=self.device)
                row = dict(zip(keys, self.accelerator.reduce(local, "mean").tolist()))  # every rank takes part
                forwarded = self.forwarded_over_ranks()
                # a mean over the window's steps, as the row's other figures; the run's training time so far,
                # an earlier process's of a resumed run included
                step_s, window, window_start = (time.perf_counter() - window_start) / len(window), [], time.perf_counter()
                if self.is_main:
                    row.update({"step": self.step_count, "train/lr": self.lr, "train/responses_forwarded": forwarded,
                                "timing/step_s": step_s, "timing/elapsed_s": self.clock.state_dict()["seconds"]})
                    self.run_log.log(row, self.step_count)
                    self.last_train = row
                    bar.set_postfix(loss=f"{row['train/loss']:.3f}")
            if checkpoint:  # every rank takes part
                self.save_checkpoint()
        self.training = self.clock.state_dict()  # the whole run's, a resumed one's included
        self.responses_forwarded_total = self.forwarded_over_ranks()

    def open_logs(self, outputs: tuple[str, ...]) -> None:
        """Main process: the run directory started, or continued, and its metrics rows opened
        (align.tracking.RunLog: RUN/metrics.jsonl and the `report_to` sink)."""
        from align.tracking import RunLog

        start_run_dir(self.run_dir, self.cfg, CHECKPOINT_PREFIX, outputs, resume=self.resume)
        self.run_log = RunLog(self.run_dir, self.cfg, step_key="step", report_to=self.loop_cfg.report_to, wandb_project=self.loop_cfg.wandb_project,
                              resumed_at=self.step_count if self.resume else None)
        if self.run_log.kept:
            self.last_train = self.run_log.kept[-1]

    def total_seconds(self) -> float:
        """The run's wall time: this process's since `t0`, plus the training an earlier process of a
        resumed run did (as `timing/train_s` counts it), so the parts of the summary's time add up."""
        return self.clock.before["seconds"] + time.perf_counter() - self.t0

    def forwarded_over_ranks(self) -> int:
        """Responses forwarded in training by all ranks (a collective: every rank calls it)."""
        return int(self.accelerator.reduce(torch.tensor(self.responses_forwarded, device=self.device), "sum").item())

    # ------------------------------------------------------------------------------------ checkpoints

    @functools.cached_property
    def data_digest(self) -> str:
        """What this run trains on (align.checkpoint.data_fingerprint), computed once."""
        return data_fingerprint(self.train_set.items)

    def save_checkpoint(self) -> None:
        """RUN/checkpoints/step-NNNNNN (align.checkpoint): what is trained, AdamW, the schedule, the
        RNGs and the step; the batches are a function of the seed, so the step is the data position."""
        forwarded = self.accelerator.gather(torch.tensor([self.responses_forwarded], device=self.device)).tolist()
        save_training_state(self.run_dir, f"{CHECKPOINT_PREFIX}-{self.step_count:06d}", accelerator=self.accelerator,
                            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                            sharded=self.fsdp is not None, keep=self.loop_cfg.keep_checkpoints,
                            state={"step": self.step_count, "num_steps": len(self.global_batches),
                                   "config": config_to_dict(self.cfg), "responses_forwarded": forwarded,
                                   "data": self.data_digest, "models": model_fingerprints(self.model_paths),
                                   "clock": self.clock.state_dict()})

    def load_checkpoint(self, path: Path) -> None:
        state = load_training_state(
            path, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            sharded=self.fsdp is not None,
            check=lambda state: check_same_run(path, state, config=config_to_dict(self.cfg),
                                               may_change=self.resume_overridable, data=self.data_digest,
                                               num_steps=len(self.global_batches),
                                               aliases=getattr(type(self.cfg), "key_aliases", None),
                                               models=self.model_paths))
        self.step_count = state["step"]
        self.clock.load_state_dict(state.get("clock"))
        # (the reward stage's earlier checkpoints name the count forward_passes)
        self.responses_forwarded = state.get("responses_forwarded", state.get("forward_passes"))[self.rank]
        if self.is_main:
            self.echo(resumed_line(self.stage, self.run_dir, self.step_count, len(self.global_batches), "step"))
