"""`report_to`: every training stage sends its metrics rows to TensorBoard or W&B too (align.tracking).

The trackers' packages are optional and not installed here: stand-ins record what align asks of
them, which is what is checked.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest

from align.config import load_config
from align.errors import UserError
from align.run import read_mapping, read_metrics
from align.tracking import RunLog, make_tracker


class RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: keeps what each writer was given, and what
    TensorBoard shows of a log directory (`shown`): a writer's `purge_step` hides the events the
    earlier writers logged at or after it, as TensorBoard does on reading."""

    writers: list[RecordingWriter] = []
    shown: dict[str, list[tuple[str, float, int]]] = {}

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        RecordingWriter.writers.append(self)
        events = RecordingWriter.shown.setdefault(log_dir, [])
        if purge_step is not None:
            events[:] = [event for event in events if event[2] < purge_step]

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.scalars.append((key, value, step))
        RecordingWriter.shown[self.log_dir].append((key, value, step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def tensorboard(monkeypatch) -> list[RecordingWriter]:
    """A TensorBoard that is 'installed' and records: the writers the runs opened."""
    RecordingWriter.writers, RecordingWriter.shown = [], {}
    package = types.ModuleType("tensorboard")
    package.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", package)
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return RecordingWriter.writers


def numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def logged_at(writer: RecordingWriter, step: int) -> dict:
    return {key: value for key, value, at in writer.scalars if at == step}


def run_stage(stage: str, overrides: list[str]) -> dict:
    if stage == "reward":
        from reward.config import RewardConfig
        from reward.train import train_reward_model

        return train_reward_model(load_config(RewardConfig, None, overrides), echo=lambda _: None)
    from dpo.config import DPOConfig
    from dpo.train import run_dpo

    return run_dpo(load_config(DPOConfig, None, overrides), echo=lambda _: None)


@pytest.fixture
def stage_run(request, tiny_random_model, tmp_path):
    """(stage, overrides) of a seconds-long reward or DPO run with a metrics row every 2 steps."""
    return request.param, stage_overrides(request.param, tiny_random_model, tmp_path / "run")


def stage_overrides(stage: str, model, out) -> list[str]:
    if stage == "reward":
        return [f"model.name_or_path={model}", f"output_dir={out}", "model.max_length=160", "data.num_rankings=64",
                "data.num_eval_rankings=24", "train.batch_size=8", "eval.normalize=false", "train.log_every=2",
                "train.num_threads=1", "train.report_to=tensorboard"]
    return [f"policy_model={model}", f"output_dir={out}", "data.num_rankings=48", "data.num_eval_rankings=16",
            "data.k=3", "batch_size=8", "epochs=1", "num_eval_prompts=4", "response_length=8", "progress=false",
            "log_every=2", "num_threads=1", "report_to=tensorboard"]


@pytest.mark.parametrize("stage_run", ["reward", "dpo"], indirect=True)
def test_an_offline_stage_sends_its_metrics_rows_and_held_out_results_to_the_tracker(stage_run, tensorboard,
                                                                                   tmp_path):
    stage, overrides = stage_run
    summary = run_stage(stage, overrides)
    [writer] = tensorboard
    assert writer.log_dir == str(tmp_path / "run" / "tensorboard") and writer.purge_step is None
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    assert len(steps) >= 3 and steps[:2] == [2, 4]
    last = steps[-1]
    # every row as metrics.jsonl has it, at its step; the held-out results join the last step's
    for row in rows[:-1]:
        assert logged_at(writer, row["step"]) == numeric(row)
    held_out = {k: v for k, v in numeric(summary).items() if k.startswith("eval")}
    assert "eval/accuracy" in held_out
    assert logged_at(writer, last) == {**numeric(rows[-1]), **held_out}
    assert {step for _, _, step in writer.scalars} == set(steps) and writer.closed


def test_a_run_log_writes_each_row_to_metrics_jsonl_and_the_sink_and_closes_once(tmp_path, tensorboard):
    from dpo.config import DPOConfig

    def open_log(resumed_at):
        (tmp_path / "run").mkdir(exist_ok=True)
        return RunLog(tmp_path / "run", load_config(DPOConfig, None, []), step_key="step", report_to="tensorboard",
                      wandb_project="align", resumed_at=resumed_at)

    log = open_log(None)
    rows = [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.25}]
    for row in rows:
        log.log(row, row["step"])
    summary = {"train/loss": 0.25, "eval/accuracy": 0.75, "eval_annotators/ann-1/accuracy": 1.0, "model_dir": "RUN"}
    log.close(summary, 2)
    log.close(failed=True)  # a second close (the stage's error path after its finish) does nothing
    [writer] = tensorboard
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == rows
    # the rows at their steps, then the summary's held-out keys (every `eval` one) at the last step
    assert writer.scalars == [("step", 1, 1), ("train/loss", 0.5, 1), ("step", 2, 2), ("train/loss", 0.25, 2),
                              ("eval/accuracy", 0.75, 2), ("eval_annotators/ann-1/accuracy", 1.0, 2)]
    assert writer.closed

    resumed = open_log(1)  # from a checkpoint at step 1: step 2's row is written again
    assert resumed.kept == rows[:1] and read_metrics(tmp_path / "run" / "metrics.jsonl") == rows[:1]
    # the sink drops what was logged from the checkpoint's step on and gets that step's row again
    assert tensorboard[1].purge_step == 1 and tensorboard[1].scalars == [("step", 1, 1), ("train/loss", 0.5, 1)]
    assert RecordingWriter.shown[writer.log_dir] == tensorboard[1].scalars
    resumed.close(failed=True)


def test_a_run_log_closed_on_an_error_marks_the_wandb_run_failed(monkeypatch, tmp_path):
    from dpo.config import DPOConfig

    finished = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: types.SimpleNamespace(id="run-1", log=lambda *a, **k: None,
                                                        finish=lambda exit_code=None: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    for failed in (False, True):
        (tmp_path / f"run-{failed}").mkdir()
        RunLog(tmp_path / f"run-{failed}", load_config(DPOConfig, None, []), step_key="step", report_to="wandb",
               wandb_project="align", resumed_at=None).close(failed=failed)
    assert finished == [0, 1]


@pytest.mark.parametrize("stage", ["reward", "dpo", "ppo"])
def test_a_stage_that_stops_on_an_error_still_closes_its_sink(stage, monkeypatch, tensorboard, tiny_random_model,
                                                             random_reward_model, tmp_path):
    """TensorBoard writes out its queued events on close: a run that fails keeps what it logged."""
    if stage == "ppo":
        from ppo.config import PPOConfig
        from ppo.trainer import PPOTrainer, run_ppo

        trainer_class, counter = PPOTrainer, "iteration"
        overrides = [f"policy_model={tiny_random_model}", f"reward_model={random_reward_model}",
                     f"output_dir={tmp_path / 'run'}", "num_prompts=32", "num_eval_prompts=4", "num_iterations=4",
                     "batch_size=8", "num_mini_batches=2", "num_ppo_epochs=1", "response_length=8", "save_every=0",
                     "progress=false", "report_to=tensorboard"]

        def start():
            run_ppo(load_config(PPOConfig, None, overrides))
    else:
        if stage == "reward":
            from reward.train import RewardTrainer as trainer_class
        else:
            from dpo.train import DPOTrainer as trainer_class
        counter = "step_count"
        overrides = stage_overrides(stage, tiny_random_model, tmp_path / "run")

        def start():
            run_stage(stage, overrides)

    real_step = trainer_class.step

    def step_then_fail(self, *args):
        if getattr(self, counter) == 2:
            raise RuntimeError("the disk is full")
        return real_step(self, *args)

    monkeypatch.setattr(trainer_class, "step", step_then_fail)
    with pytest.raises(RuntimeError, match="the disk is full"):
        start()
    [writer] = tensorboard
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows and writer.closed  # the rows before the error were logged, and written out
    assert {step for _, _, step in writer.scalars} == {row["iteration" if stage == "ppo" else "step"] for row in rows}


@pytest.mark.parametrize("stage_run", ["dpo"], indirect=True)  # the step loop the reward stage shares
def test_a_resumed_offline_run_drops_the_tracker_events_after_its_checkpoint(stage_run, tensorboard, tmp_path):
    from dpo.config import DPOConfig
    from dpo.train import DPOTrainer, run_dpo
    from tests.stopping import train_until

    out = tmp_path / "run"
    overrides = [*stage_run[1], "epochs=2", "save_every=3"]
    trainer = DPOTrainer(load_config(DPOConfig, None, overrides), echo=lambda _: None)
    trainer.setup()
    train_until(trainer, 5)  # rows at 2, 3 (the checkpoint's), 4; stopped in step 6
    first = tensorboard[0]
    assert sorted({step for _, _, step in first.scalars}) == [2, 3, 4]

    run_dpo(load_config(DPOConfig, out / "config.yaml"), echo=lambda _: None, resume=True)
    second = tensorboard[1]
    # TensorBoard drops the stopped run's events from the checkpoint's step 3 on; step 3's row is sent
    # again from metrics.jsonl and the later ones are logged again, as in metrics.jsonl
    assert second.purge_step == 3
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows][:3] == [2, 3, 4]
    assert sorted({step for _, _, step in second.scalars}) == [r["step"] for r in rows if r["step"] >= 3]
    assert shown_once_as_in(out, rows)
    assert read_mapping(out / "config.yaml")["report_to"] == "tensorboard"


def shown_once_as_in(out, rows: list[dict]) -> bool:
    """TensorBoard shows each metric once at each step, the rows of metrics.jsonl among them."""
    shown = RecordingWriter.shown[str(out / "tensorboard")]
    at = [(key, step) for key, _, step in shown]
    return len(at) == len(set(at)) and all(logged == numeric(row) for row in rows
                                           if (logged := {k: v for k, v, step in shown if step == row["step"]
                                                          and not k.startswith("eval")}))


@pytest.mark.parametrize("stage_run", ["dpo"], indirect=True)
def test_a_finished_run_resumed_shows_its_held_out_results_once(stage_run, tensorboard, tmp_path):
    from dpo.config import DPOConfig
    from dpo.train import run_dpo

    out = tmp_path / "run"
    summary = run_dpo(load_config(DPOConfig, None, [*stage_run[1], "save_every=3"]), echo=lambda _: None)
    last = summary["train/steps"]
    run_dpo(load_config(DPOConfig, out / "config.yaml"), echo=lambda _: None, resume=True)  # evaluates again
    assert len(tensorboard) == 2 and tensorboard[1].purge_step == last
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["step"] == last and shown_once_as_in(out, rows)
    held_out = {key for key, _, step in RecordingWriter.shown[str(out / "tensorboard")] if key.startswith("eval")}
    assert "eval/accuracy" in held_out


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
@pytest.mark.parametrize("stage_run", ["reward", "dpo"], indirect=True)
def test_report_to_wandb_without_the_package_fails_before_the_stage_loads(stage_run, capsys, tmp_path, monkeypatch):
    import align.modeling
    from align.commands.cli import main

    def load_tokenizer(*args, **kwargs):
        raise AssertionError("the stage began loading before it checked report_to's package")

    monkeypatch.setattr(align.modeling, "load_tokenizer", load_tokenizer)
    stage, overrides = stage_run
    key = "train.report_to" if stage == "reward" else "report_to"
    with pytest.raises(SystemExit) as exc:
        main([*(["reward", "train"] if stage == "reward" else ["dpo"]), *overrides, f"{key}=wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == ["error: report_to=wandb needs wandb: pip install wandb"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage_run", ["reward", "dpo"], indirect=True)
def test_an_unknown_sink_is_refused_with_the_key_named(stage_run, capsys, tmp_path):
    from align.commands.cli import main

    stage, overrides = stage_run
    key = "train.report_to" if stage == "reward" else "report_to"
    with pytest.raises(SystemExit) as exc:
        main([*(["reward", "train"] if stage == "reward" else ["dpo"]), *overrides, f"{key}=mlflow"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and key in err and "mlflow" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("run_dir_module", ["reward.run_dir", "ppo.run_dir", "dpo.run_dir"])
def test_a_fresh_run_over_an_earlier_one_neither_shows_its_events_nor_continues_its_wandb_run(run_dir_module,
                                                                                            tmp_path):
    import importlib

    from align.checkpoint import clear_earlier_run

    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"earlier")
    (tmp_path / "wandb_run_id").write_text("earlier-experiment")
    (tmp_path / "wandb").mkdir()  # W&B's own store (an offline run may wait there to be synced): kept
    clear_earlier_run(tmp_path, "step", importlib.import_module(run_dir_module).OUTPUTS)  # overwrite=true
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wandb"]


def test_a_wandb_run_that_cannot_start_is_one_line_naming_the_way_out(monkeypatch, tmp_path):
    wandb = types.ModuleType("wandb")

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    wandb.init = init
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    with pytest.raises(UserError) as info:
        make_tracker("wandb", tmp_path, "align", {})
    assert str(info.value) == ("report_to=wandb: W&B could not start the run (RuntimeError: api_key not configured "
                               "(no-tty)); log in (wandb login), set WANDB_MODE=offline, or choose another report_to")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_to_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="pip install tensorboard"):
        make_tracker("tensorboard", tmp_path, "align", {})


def test_a_resumed_run_continues_its_tracker_history(monkeypatch, tmp_path, tensorboard):
    make_tracker("tensorboard", tmp_path, "align", {})
    make_tracker("tensorboard", tmp_path, "align", {}, resumed_at=4)
    # from the checkpoint at iteration 4 on, what the stopped run wrote goes (4's rows are sent again)
    assert [writer.purge_step for writer in tensorboard] == [None, 4]

    calls = []
    wandb = types.ModuleType("wandb")
    runs = iter(["first", "second"])

    class Config(dict):
        def update(self, values, allow_val_change=False):
            calls.append(("config", (values, allow_val_change)))

    def init(**kwargs):
        calls.append(("wandb", kwargs))
        return types.SimpleNamespace(id=kwargs.get("id") or next(runs), config=Config())

    wandb.init = init
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    make_tracker("wandb", tmp_path, "align", {"num_threads": 1})
    make_tracker("wandb", tmp_path, "align", {"num_threads": 2}, resumed_at=4)  # the same W&B run continues
    inits = [kw for name, kw in calls if name == "wandb"]
    assert [(kw.get("id"), kw.get("resume")) for kw in inits] == [(None, None), ("first", "allow")]
    # a setting --resume may change updates the continued run's config instead of conflicting with it
    assert [args for name, args in calls if name == "config"] == [({"num_threads": 2}, True)]
    make_tracker("wandb", tmp_path, "align", {})  # a new run (overwrite=true) starts a new W&B run
    assert (tmp_path / "wandb_run_id").read_text() == "second"
