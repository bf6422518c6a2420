"""User mistakes in `align reward train` give one line naming the problem and exit code 2."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align.config import load_config
from align.errors import ConfigError, UserError
from reward.config import RewardConfig
from tests.cli_in_process import run_align_in_process

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_cli(capsys):
    """`align reward train ARGS` in this process (tests.cli_in_process): these mistakes are words and exit codes."""
    return lambda *args: run_align_in_process(capsys, "reward", "train", *args)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.learnin_rate=1e-4", "did you mean 'train.learning_rate'"),
        ("train.learning_rate=-0.1", "train.learning_rate: must be > 0"),
        ("data.format=kwise", "data.path is required"),
        ("data.agreement=0.3", "data.agreement: must be > 0.5"),
        ("train.seed=99999999999999999999", "train.seed: must be <= 2147483647"),  # not an overflow traceback
        ("train.gradient_accumulation_steps=33", "train.gradient_accumulation_steps (33) is more micro-batches than "
                                                 "a step has rankings (train.batch_size 32)"),
    ],
)
def test_bad_config_values_are_refused_with_the_key_named(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(RewardConfig, None, [override])


def test_cli_missing_data_file_is_one_line_exit_2(tmp_path, run_cli):
    result = run_cli("data.format=kwise", f"data.path={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: data.path: file not found: {tmp_path / 'missing.jsonl'}"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_typo_suggests_the_key(tmp_path, run_cli):
    result = run_cli("train.bach_size=8", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown config key 'train.bach_size' for RewardConfig; did you mean 'train.batch_size'?"]


def test_cli_negative_lr(tmp_path, run_cli):
    result = run_cli("train.learning_rate=-1e-4", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.learning_rate: must be > 0, got -0.0001"


def test_config_yaml_files_load():
    for name in ("demo", "real"):
        path = REPO / "configs" / name / "reward.yaml"
        if name == "real" and not path.exists():
            continue
        cfg = load_config(RewardConfig, path, ["data.path=" + str(path)] if name == "real" else [])
        assert cfg.train.loss == "kwise"


def test_a_data_source_the_format_does_not_read_is_refused_for_a_new_run_not_ignored(tmp_path, run_cli):
    # a data.path given without data.format trained on the synthetic task without a word
    from pathlib import Path

    from align.config import ConfigError, load_config
    from reward.config import RewardConfig

    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("")
    result = run_cli(f"data.path={rankings}", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: data.path is set but data.format=synthetic does not read it: set data.format to the source's format "
        "(kwise, trl, hh or oasst for a file; annotation for data.db_url and data.project), or data.path=null to "
        "leave it out") and not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"^data.db_url is set but data.format=kwise does not read it"):
        load_config(RewardConfig, None, ["data.format=kwise", f"data.path={rankings}",
                                         "data.db_url=sqlite:///a.db"]).data.check_sources_read()
    real = Path(__file__).resolve().parents[2] / "configs" / "real" / "reward.yaml"  # format oasst and its path
    with pytest.raises(ConfigError, match=r"^data.path is set but data.format=synthetic"):
        load_config(RewardConfig, real, ["data.format=synthetic"]).data.check_sources_read()
    load_config(RewardConfig, real, ["data.format=synthetic", "data.path=null"]).data.check_sources_read()
    # a stopped run's config.yaml that holds one still loads, to be resumed as it trained
    assert load_config(RewardConfig, None, [f"data.path={rankings}"]).data.path == str(rankings)


def test_score_and_eval_mistakes_are_refused_before_a_model_loads(tmp_path, capsys):
    def align(*args: str) -> subprocess.CompletedProcess:
        return run_align_in_process(capsys, "reward", *args)

    bad_prompt, ties = tmp_path / "bad.jsonl", tmp_path / "ties.jsonl"
    bad_prompt.write_text('{"prompt": 5, "response": "x"}\n')
    ties.write_text('{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 0]}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "response": "x"}\n')
    missing = str(tmp_path / "no-model")  # never reached: each mistake is found first
    for args, expected in [
        (["score", "-m", missing, "-i", str(bad_prompt)], f"{bad_prompt}:1: the prompt must be a string"),
        (["score", "-m", missing, "-i", str(good), "-o", str(tmp_path)], f"--out {tmp_path}: a directory"),
        (["score", "-m", missing, "-i", str(good), "-o", str(tmp_path / "no" / "x.jsonl")],
         f"--out {tmp_path / 'no' / 'x.jsonl'}: its directory {tmp_path / 'no'} does not exist"),
        (["eval", "-m", missing, "-d", str(ties)], f"{ties}: no ranking states a preference"),
        (["score", "-m", missing, "-i", str(good)], f"reward model not found: {missing}"),  # said as such
        (["score", "-m", str(tmp_path), "-i", str(good)], f"{tmp_path} is not a reward model"),
    ]:
        result = align(*args)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {expected}"), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_progress_is_a_key_of_the_train_section(tmp_path, run_cli):
    # `align ppo` and `align dpo` have a top-level `progress`; here it sits with the other loop settings
    result = run_cli("progress=false", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: unknown config key 'progress' for RewardConfig; did you mean 'train.progress'?")


@pytest.mark.parametrize("progress", [True, False])
def test_training_draws_a_progress_bar_unless_told_not_to(quick_config, capsys, progress):
    from reward.train import train_reward_model

    train_reward_model(quick_config("train.max_steps=2", "eval.normalize=false", f"train.progress={progress}"),
                       echo=lambda _: None)
    bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("reward: ")]
    assert bool(bar) == progress
    if progress:
        assert "2/2" in bar[-1] and "loss=" in bar[-1]


def test_score_writes_the_scores_and_nothing_else(random_reward_model, tmp_path):
    # stdout holds one JSON line per input line; stderr no loading bar or library notice
    good = tmp_path / "in.jsonl"
    good.write_text('{"prompt": "p", "response": "x"}\n{"prompt": "p", "response": "y"}\n')
    result = subprocess.run([sys.executable, "-m", "align", "reward", "score", "-m", str(random_reward_model),
                             "-i", str(good)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [sorted(json.loads(line)) for line in result.stdout.splitlines()] == [
        ["prompt", "response", "reward", "reward_raw"]] * 2
    assert result.stderr == ""


def _writes_fail(monkeypatch, folder, code):
    """Creating or writing a file in `folder` fails with `code` (as root, chmod would not stop it)."""
    def refuse(path):
        if Path(os.fsdecode(path)).parent == folder:
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_io_open = os.open, io.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def io_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wax+"):
            refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)


def _score(capsys, *args):
    from align.commands.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reward", "score", *args])
    out = capsys.readouterr()
    return exc.value.code, out.err


def test_score_to_a_folder_it_cannot_write_is_one_line(random_reward_model, tmp_path, monkeypatch, capsys):
    good, folder = tmp_path / "in.jsonl", tmp_path / "read-only"
    good.write_text('{"prompt": "p", "response": "x"}\n')
    folder.mkdir()
    _writes_fail(monkeypatch, folder, errno.EROFS)
    code, err = _score(capsys, "-m", str(random_reward_model), "-i", str(good), "-o", str(folder / "scores.jsonl"))
    assert code == 2 and err == f"error: cannot write {folder / 'scores.jsonl'}: Read-only file system\n"
    assert list(folder.iterdir()) == []


def test_score_that_fails_while_writing_leaves_the_earlier_file_whole(random_reward_model, tmp_path, monkeypatch,
                                                                    capsys):
    good, out = tmp_path / "in.jsonl", tmp_path / "scores.jsonl"
    good.write_text('{"prompt": "p", "response": "x"}\n')
    out.write_text("earlier scores\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", disk_full)
    code, err = _score(capsys, "-m", str(random_reward_model), "-i", str(good), "-o", str(out), "--force")
    assert code == 2 and err == f"error: cannot write {out}: No space left on device\n"
    assert out.read_text() == "earlier scores\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl",
                                                                                                  "scores.jsonl"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, err = _score(capsys, "-m", str(random_reward_model), "-i", str(good), "-o", str(out), "--force")
    assert code in (0, None) and err == f"scored 1 responses -> {out}\n"
    assert sorted(json.loads(out.read_text())) == ["prompt", "response", "reward", "reward_raw"]


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_score_replaces_an_existing_out_only_with_force(random_reward_model, tmp_path, capsys):
    good, out = tmp_path / "in.jsonl", tmp_path / "scores.jsonl"
    good.write_text('{"prompt": "p", "response": "x"}\n')
    out.write_text("earlier scores\n")
    code, err = _score(capsys, "-m", str(random_reward_model), "-i", str(good), "-o", str(out))
    assert code == 2 and err == f"error: {out} already exists; choose another --out or pass --force to replace it\n"
    assert _contents(tmp_path) == {"in.jsonl": good.read_bytes(), "scores.jsonl": b"earlier scores\n"}
    code, err = _score(capsys, "-m", str(random_reward_model), "-i", str(good), "-o", str(out), "--force")
    assert code in (0, None) and sorted(json.loads(out.read_text())) == ["prompt", "response", "reward", "reward_raw"]


def test_score_never_writes_over_its_input_or_into_the_model_even_with_force(random_reward_model, tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    model = shutil.copytree(random_reward_model, run / "model")
    good = tmp_path / "in.jsonl"
    good.write_text('{"prompt": "p", "response": "x"}\n')
    link = tmp_path / "link.jsonl"
    link.symlink_to(model / "config.json")
    before = _contents(tmp_path)
    for model_arg in (run, model):
        for out, expected in [
            (good, f"--out {good} is the --input file"),
            (model / "config.json", f"--out {model / 'config.json'} is inside {model}, a checkpoint the scores"),
            (model / "scores.jsonl", f"--out {model / 'scores.jsonl'} is inside {model}, a checkpoint the scores"),
            (link, f"--out {link} is inside {model}, a checkpoint the scores"),
        ]:
            for force in ([], ["--force"]):
                code, err = _score(capsys, "-m", str(model_arg), "-i", str(good), "-o", str(out), *force)
                assert code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1, (out, err)
    (run / "summary.json").write_text("{}")  # the run's record, beside its model
    before = _contents(tmp_path)
    code, err = _score(capsys, "-m", str(run), "-i", str(good), "-o", str(run / "summary.json"), "--force")
    assert code == 2 and err == f"error: --out {run / 'summary.json'} is inside the run {run} the scores are read " \
                               "from: choose another --out\n"
    assert _contents(tmp_path) == before and link.is_symlink()


def _eval(capsys, *args):
    from align.commands.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reward", "eval", *args])
    return exc.value.code, capsys.readouterr().err


def test_eval_says_why_a_file_gave_no_rankings(tmp_path, capsys):
    empty, blank, unranked = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "oasst.jsonl"
    empty.write_text("")
    blank.write_text("\n\n")
    unranked.write_text(json.dumps({"prompt": {"message_id": "m1", "role": "prompter", "text": "hi", "replies": [
        {"message_id": "m2", "role": "assistant", "text": "hello", "rank": None, "replies": []}]}}) + "\n")
    missing = str(tmp_path / "no-model")  # never reached: the data is refused first
    cases = [(empty, fmt, f"{empty} is empty: no rankings to evaluate on") for fmt in ("kwise", "trl", "hh", "oasst")]
    cases += [(blank, "trl", f"{blank} is empty: no rankings to evaluate on"),
              (unranked, "oasst", f"{unranked}: no ranked replies: its message tree has no two sibling assistant "
                                  "replies that both carry a rank (a reply whose rank is null is left out)")]
    for data, fmt, expected in cases:
        code, err = _eval(capsys, "-m", missing, "-d", str(data), "-f", fmt)
        assert code == 2 and err == f"error: {expected}\n", (data, fmt, err)


def test_a_checkpoint_that_is_no_align_reward_model_is_told_why(tmp_path):
    from align.errors import UserError
    from reward.run_dir import model_dir

    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}', encoding="utf-8")
    with pytest.raises(UserError, match=f"read once imported: align reward import {tmp_path} --policy SFT") as refused:
        model_dir(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path} is not a reward model (no reward_normalization.json")


def test_eval_tells_the_training_prompts_only_from_the_data_the_run_read(tmp_path, monkeypatch):
    """`reward eval` says which rankings were trained on from the run's recorded data: from any folder,
    and, where that file changed since (a re-export moves the split) or is gone, that it cannot tell."""
    from align.config import config_to_dict, load_config
    from align.exports import write_kwise
    from align.synthetic import make_rankings
    from reward.cli import training_prompts
    from reward.config import RewardConfig
    from reward.data import load_reward_data, prompt_key
    from reward.run_dir import INFO_FILE

    monkeypatch.chdir(tmp_path)
    write_kwise(make_rankings(40, k=3, seed=2), tmp_path / "rankings.jsonl")
    cfg = load_config(RewardConfig, None, ["data.format=kwise", "data.path=rankings.jsonl"])  # relative, as typed
    data = load_reward_data(cfg.data)
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / INFO_FILE).write_text(json.dumps({"config": config_to_dict(cfg), "data": data.source}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    prompts, why = training_prompts(model)
    assert prompts == {prompt_key(r) for r in data.train} and why == ""

    with (tmp_path / "rankings.jsonl").open("a") as f:  # more rankings exported since: the split would move
        f.write(json.dumps({"prompt": "a new question", "responses": ["a", "b"], "ranks": [0, 1]}) + "\n")
    prompts, why = training_prompts(model)
    assert prompts is None and why.startswith(f"the rankings it was trained on ({tmp_path / 'rankings.jsonl'}) have "
                                              "changed since or are gone, so whether these rankings are among")
    (tmp_path / "rankings.jsonl").unlink()
    assert training_prompts(model)[0] is None
    (model / INFO_FILE).write_text(json.dumps({"imported_from": "/models/rm", "config": {}, "data": {}}))
    assert training_prompts(model) == (None, "a reward model trained elsewhere (/models/rm), so whether these "
                                             "rankings are among those it was trained on cannot be told")


def test_score_never_puts_a_file_in_place_of_a_link_even_with_force(random_reward_model, tmp_path, capsys):
    good, kept, link = tmp_path / "in.jsonl", tmp_path / "kept.jsonl", tmp_path / "link.jsonl"
    good.write_text('{"prompt": "p", "response": "x"}\n')
    kept.write_text("kept\n")
    link.symlink_to(kept)
    code, err = _score(capsys, "-m", str(random_reward_model), "-i", str(good), "-o", str(link), "--force")
    assert code == 2 and err == f"error: --out {link} is a symbolic link (to {kept}); give the file's own path\n"
    assert link.is_symlink() and kept.read_text() == "kept\n"


@pytest.mark.parametrize("key", ["model.name_or_path", "eval.normalize_policy"])
def test_a_reward_model_to_sample_the_normalisation_from_is_refused_before_training(quick_config, random_reward_model,
                                                                                   tiny_random_model, key):
    # it trained every step, then the normalisation refused to load it as a policy and the weights were lost
    from reward.train import RewardTrainer

    others = {"model.name_or_path": [], "eval.normalize_policy": [f"model.name_or_path={tiny_random_model}"]}[key]
    cfg = quick_config(*others, f"{key}={random_reward_model}")
    trainer = RewardTrainer(cfg)
    with pytest.raises(UserError, match=rf"^{key} {random_reward_model.resolve()} is a reward model \(sequence "
                                        r"classification\), not a causal LM, and the reward normalisation samples"):
        trainer.setup()
    assert trainer.step_count == 0 and not (Path(cfg.output_dir) / "metrics.jsonl").exists()
    assert quick_config(f"model.name_or_path={random_reward_model}", "eval.normalize=false").eval.normalize is False


def test_score_says_when_it_replaces_the_input_s_own_rewards(random_reward_model, tmp_path, capsys):
    good, out = tmp_path / "in.jsonl", tmp_path / "scores.jsonl"
    good.write_text('{"prompt": "p", "response": "x", "reward": 7.5}\n{"prompt": "p", "response": "y"}\n')
    code, err = _score(capsys, "-m", str(random_reward_model), "-i", str(good), "-o", str(out))
    assert code in (0, None) and err.splitlines() == [
        "note: 1 of the 2 input lines held a `reward` or `reward_raw` of their own, replaced by this model's",
        f"scored 2 responses -> {out}"]
    assert [json.loads(line)["reward"] != 7.5 for line in out.read_text().splitlines()] == [True, True]
