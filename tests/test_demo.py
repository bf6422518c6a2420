"""`align demo` end to end on the random tiny model (small settings; the real run is in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from align.commands.demo import CONFIGS, run_demo, split_overrides
from align.config import ConfigError
from align.errors import UserError


def test_overrides_are_routed_to_their_stage():
    demo, reward, ppo, dpo = split_overrides(["k=3", "reward.train.learning_rate=0.1", "ppo.kl.coef=0.2", "dpo.beta=0.2"])
    assert (demo, reward, ppo, dpo) == (["k=3"], ["train.learning_rate=0.1"], ["kl.coef=0.2"], ["beta=0.2"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_promps=5"], "did you mean 'num_prompts'"),
        (["reward.train.learnin_rate=0.1"], "did you mean 'train.learning_rate'"),
        (["ppo.kl_coeff=0.1"], r"^ppo stage \(ppo.KEY=VALUE\): unknown config key 'kl_coeff' for PPOConfig"),
        (["annotators_per_prompt=5", "num_annotators=2"], "exceeds num_annotators"),
        (["method=reinforce"], "method"),
        (["method=dpo", "dpo.bta=0.1"], "did you mean 'beta'"),
        (["method=grpo", "ppo.samples_per_prompt=1"], "needs samples_per_prompt >= 2"),
        # a stage the method does not run: its overrides are checked all the same, then refused
        (["method=dpo", "ppo.bogus=1", "reward.bogus=2"], "^reward stage .*unknown config key 'bogus' for RewardConfig"),
        (["method=dpo", "ppo.bogus=1"], "unknown config key 'bogus' for PPOConfig"),
        (["dpo.beta=banana"], r"^dpo stage \(dpo.KEY=VALUE\): beta: expected a number, got 'banana'"),
        (["method=rloo", "dpo.beta=-1"], "beta: must be > 0"),
        (["method=dpo", "ppo.kl.coef=0.1"],
         r"^'ppo.kl.coef' is not used: ppo.\* overrides need method=ppo/rloo/grpo; this demo runs dpo$"),
        (["method=dpo", "reward.train.epochs=2"],
         r"^'reward.train.epochs' is not used: reward.\* overrides need method=ppo/rloo/grpo \(the roads with a "
         r"reward model\); this demo runs dpo$"),
        (["dpo.beta=0.2"], r"^'dpo.beta' is not used: dpo.\* overrides need method=dpo; this demo runs ppo$"),
        (["method=grpo", "dpo.beta=0.2"], r"dpo.\* overrides need method=dpo; this demo runs grpo$"),
        # a key the demo sets for a stage it runs: DPO trained on another file, announced as the demo's rankings;
        # GRPO's summary said method grpo of a PPO run
        (["method=dpo", "dpo.data.path=other.jsonl"],
         r"^dpo.data.path is set by the demo's rankings \(.*/demo/rankings.kwise.jsonl\), not by a dpo.\* override$"),
        (["method=dpo", "dpo.data={format: trl, eval_fraction: 0.2}"], r"^dpo.data.format is set by the demo's rankings"),
        (["reward.data.path=/nonexist.jsonl"], r"^reward.data.path is set by the demo's rankings"),
        (["method=grpo", "ppo.method=ppo"], r"^ppo.method is set by the demo's `method` \(grpo\), not by a ppo.\* override$"),
        (["ppo.policy_model=other"], r"^ppo.policy_model is set by the demo's `model` \(.*no-model\)"),
        (["reward.model={name_or_path: other}"], r"^reward.model.name_or_path is set by the demo's `model`"),
        (["ppo.reward_model=other"], r"^ppo.reward_model is set by the demo's reward model \(.*/demo/reward\)"),
        (["method=rloo", "ppo.output_dir=elsewhere"], r"^ppo.output_dir is set by the demo's --out \(.*/demo/ppo\)"),
        (["method=dpo", "dpo.overwrite=false"], r"^dpo.overwrite is set by the demo's --continue / --force"),
        # the demo's method runs on another method's PPO-stage config (ppo.yaml's one sample per prompt is too
        # few for GRPO), and a held-out file that is not there (it failed at stage 4 of 6)
        (["method=grpo", f"ppo_config={CONFIGS / 'ppo.yaml'}"], "needs samples_per_prompt >= 2"),
        (["method=dpo", "dpo.data.eval_path=/nonexist.jsonl"],
         r"^dpo stage \(dpo.KEY=VALUE\): data.eval_path: file not found: /nonexist.jsonl$"),
        (["reward.data.eval_path=/nonexist.jsonl"], r"^reward stage \(reward.KEY=VALUE\): data.eval_path: file not found"),
    ],
)
def test_bad_overrides_stop_before_any_work(tmp_path, overrides, message):
    # with no SFT model a refusal that came after the first stage had started would be another error
    with pytest.raises(ConfigError, match=message):
        run_demo(tmp_path / "demo", config_path=None, overrides=[f"model={tmp_path / 'no-model'}", *overrides])
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_its_report(tiny_random_model, tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, config_path=None, overrides=[
        f"model={tiny_random_model}", "num_prompts=24", "k=3", "num_annotators=2", "annotators_per_prompt=2",
        "num_eval_prompts=6", "max_new_tokens=10",
        "reward.eval.normalize_prompts=8", "reward.train.batch_size=8",
        "ppo.num_iterations=2", "ppo.batch_size=8", "ppo.num_mini_batches=2", "ppo.response_length=10",
        "ppo.num_eval_prompts=6", "ppo.save_every=0", "ppo.temperature=0.9",
    ])
    # Every prompt was ranked by both simulated annotators, through the web app's services.
    rankings = [json.loads(line) for line in (out / "rankings.kwise.jsonl").read_text().splitlines()]
    assert len(rankings) == 48
    assert {r["annotator"] for r in rankings} == {"simulated-0", "simulated-1"}
    assert all(len(r["responses"]) == 3 and len(r["ranks"]) == 3 for r in rankings)
    # Each stage left its run directory; the demo's summary carries the PPO eval keys.
    assert (out / "reward" / "model" / "reward_normalization.json").exists()
    assert (out / "ppo" / "policy" / "adapter_config.json").exists()
    assert (out / "export" / "model.safetensors").exists() and (out / "export" / "README.md").exists()
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("eval/reward_sft", "eval/reward_policy", "eval/gold_sft", "eval/gold_policy", "eval/gold_sft_std",
                "eval/kl", "demo/gold_export", "demo/gold_sft"):
        assert key in on_disk and on_disk[key] == pytest.approx(summary[key])
    # SFT and exported model are compared on samples drawn like PPO's own evaluation samples
    assert on_disk["demo/temperature"] == 0.9
    report = (out / "report.md").read_text()
    # the PPO run's own curves are linked, not redrawn; the gold plot shows the table's comparison
    for png in ("ppo/reward.png", "ppo/kl.png", "gold_scores.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| gold judge score | {on_disk['demo/gold_sft']:.3f} | {on_disk['demo/gold_export']:.3f} |" in report
    # a second demo into the same folder is refused before it touches anything
    with pytest.raises(UserError, match="holds an earlier demo .*--continue.*--force"):
        run_demo(out, config_path=None, overrides=[f"model={tiny_random_model}"])
    assert (out / "report.md").read_text() == report


@pytest.mark.slow
def test_demo_takes_the_dpo_road_without_a_reward_model(tiny_random_model, tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, config_path=None, overrides=[
        f"model={tiny_random_model}", "method=dpo", "num_prompts=24", "k=3", "num_eval_prompts=6",
        "max_new_tokens=10", "dpo.batch_size=8", "dpo.num_eval_prompts=6", "dpo.response_length=10",
        "dpo.data.eval_fraction=0.25",
    ])
    assert not (out / "reward").exists() and (out / "dpo" / "policy" / "adapter_config.json").exists()
    assert (out / "export" / "model.safetensors").exists() and "DPO settings" in (out / "export" / "README.md").read_text()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["demo/method"] == "dpo" and "demo/reward_sft" not in on_disk
    assert on_disk["eval/num_pairs"] > 0 and on_disk["demo/gold_export"] == pytest.approx(summary["demo/gold_export"])
    report = (out / "report.md").read_text()
    assert "reward-model score" not in report and "implicit reward" in report


def test_an_override_of_what_the_demo_sets_is_refused_in_one_line(tmp_path):
    # `align demo method=dpo dpo.data.path=other.jsonl` trained DPO on that file "on the 120 rankings"
    out = tmp_path / "d"
    result = subprocess.run([sys.executable, "-m", "align", "demo", "--out", str(out), "method=dpo",
                             "dpo.data.path=other.jsonl"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: dpo.data.path is set by the demo's rankings ({out / 'rankings.kwise.jsonl'}), not by a dpo.* override"]
    assert not out.exists()


def test_only_the_keys_the_demo_sets_are_refused(tmp_path):
    # the stages' other settings are overrides as before, a section's mapping included
    from align.commands.demo import DemoConfig, refuse_demo_settings

    cfg = DemoConfig(method="grpo")
    refuse_demo_settings(cfg, tmp_path, {"reward": ["data.eval_fraction=0.2", "train={epochs: 1}"],
                                         "ppo": ["kl.coef=0.2", "temperature=0.5"]})
    with pytest.raises(ConfigError, match=r"^ppo.method is set by the demo's `method` \(grpo\)"):
        refuse_demo_settings(cfg, tmp_path, {"ppo": ["kl.coef=0.2", "method=ppo"]})


def test_continue_without_a_database_is_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "align", "demo", "--continue", "--out", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nothing to continue" in result.stderr and "Traceback" not in result.stderr


def earlier_demo(out, *, rankings_db: bool = False, ranked: bool = False):
    """A folder as a finished demo leaves it (the files' contents do not matter here, but for its
    config.yaml, a demo's), and a file of the user's. `ranked`: the database's demo project holds a ranking."""
    from align.commands.demo import DemoConfig
    from align.config import save_config

    out.mkdir()
    for name in ("report.md", "summary.json", "comparison.jsonl", "rankings.kwise.jsonl"):
        (out / name).write_text("earlier\n")
    save_config(DemoConfig(), out / "config.yaml")
    for folder in ("export", "reward", "ppo"):
        (out / folder).mkdir()
        (out / folder / "model.safetensors").write_text("earlier")
    (out / "notes.txt").write_text("mine")
    if rankings_db or ranked:  # the demo project, with no rankings yet unless `ranked`
        from align.formats import Ranking
        from annotation import services
        from annotation.db import open_db

        with open_db(f"sqlite:///{out / 'annotation.db'}")() as db:
            project = services.create_project(db, "demo", k=3, annotators_per_prompt=1)
            if ranked:
                services.import_rankings(db, project, [Ranking("p", ["a", "b", "c"], [1, 0, 2], "ann")], "kwise")
    else:
        (out / "annotation.db").write_text("")


def test_an_earlier_demo_is_refused_in_one_line_without_continue_or_force(tmp_path):
    # it was redone in place, and a re-run stopped half-way left the earlier report and export behind
    out = tmp_path / "demo"
    earlier_demo(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = subprocess.run([sys.executable, "-m", "align", "demo", "--out", str(out), f"model={tmp_path / 'no-model'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {out} holds an earlier demo (report.md, summary.json, export, comparison.jsonl, ...): pass --continue "
        "to train again from its rankings, or --force to start over (deletes it, annotation.db and its rankings "
        "included), or choose another --out"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    result = subprocess.run([sys.executable, "-m", "align", "demo", "--out", str(out), "--continue", "--force"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --force and --continue exclude each other: --force starts over, --continue keeps the rankings"]


def test_serve_serves_an_earlier_demos_database_again_and_removes_nothing(tiny_random_model, tmp_path, monkeypatch):
    # after a first --serve, a second was refused as an earlier demo, --serve --continue excluded each other,
    # and the one way out offered, --force, deleted the rankings people had made
    import annotation.cli
    from annotation import services
    from annotation.db import open_db

    served = []
    monkeypatch.setattr(annotation.cli, "serve", lambda **kwargs: served.append(kwargs["db"]))
    out = tmp_path / "demo"
    overrides = [f"model={tiny_random_model}", "num_prompts=8", "k=3", "max_new_tokens=4"]
    assert run_demo(out, config_path=None, overrides=overrides, serve=True) == {}
    sessions = open_db(f"sqlite:///{out / 'annotation.db'}")

    def held():
        from sqlalchemy import select

        from annotation.models import Candidate, Prompt

        with sessions() as db:
            project = services.get_project(db, "demo")
            rankings = services.export_rankings(db, project)
            candidates = db.execute(select(Prompt.source_id, Candidate.position, Candidate.text).join(
                Candidate, Candidate.prompt_id == Prompt.id).order_by(Candidate.id)).all()
            return project.k, candidates, [(r.prompt, r.responses, r.ranks, r.annotator) for r in rankings]

    with sessions() as db:  # a person ranks one prompt's candidates in the app
        person = services.create_user(db, "alice", None, "annotator")
        task = services.next_task(db, person, services.get_project(db, "demo"))
        order = services.ranks_to_order([c.id for c in task.candidates], [2, 1, 3])
        services.submit_ranking(db, person, task.assignment_id, order, time_spent_ms=0)
    ranked = held()
    assert len(ranked[1]) == 8 * 3 and [row[3] for row in ranked[2]] == ["alice"]
    (out / "notes.txt").write_text("mine")
    (out / "report.md").write_text("earlier")  # as a demo that went on to train would have left it
    before = {p.name for p in out.iterdir()}
    assert run_demo(out, config_path=None, overrides=overrides, serve=True) == {}  # served again
    assert served == [f"sqlite:///{out / 'annotation.db'}"] * 2
    assert held() == ranked  # the person's ranking, and no prompt or candidate twice
    assert before <= {p.name for p in out.iterdir()}
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.md").read_text() == "earlier"
    # a full demo there is still refused, saying that --force would delete the rankings
    with pytest.raises(UserError, match=r"holds an earlier demo \(report.md, config.yaml, annotation.db[^)]*\): pass "
                                        r"--continue .* "
                                        r"or --force to start over \(deletes it, annotation.db and its rankings "
                                        r"included\), or choose another --out$"):
        run_demo(out, config_path=None, overrides=overrides)
    assert held() == ranked
    # serving again with another K is refused in the demo's own terms, and config.yaml keeps the settings
    # the database holds
    with pytest.raises(UserError, match=r"ranks k=3 candidates per prompt; k=4 differs"):
        run_demo(out, config_path=None, overrides=[*overrides[:2], "k=4", *overrides[3:]], serve=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["k"] == 3 and held() == ranked


def test_force_removes_the_earlier_demo_before_any_stage_runs(tmp_path):
    out = tmp_path / "demo"
    earlier_demo(out)
    # the first stage fails (no such model): what it started from is an empty demo folder
    with pytest.raises(UserError, match="no-model"):
        run_demo(out, config_path=None, overrides=[f"model={tmp_path / 'no-model'}"], force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]  # the new config, the user's file
    assert (out / "notes.txt").read_text() == "mine"


def test_continue_removes_the_earlier_results_and_keeps_the_rankings(tmp_path):
    out = tmp_path / "demo"
    earlier_demo(out, ranked=True)
    with pytest.raises(UserError, match="no-model"):  # stopped where the stages start
        run_demo(out, config_path=None, overrides=[f"model={tmp_path / 'no-model'}"], resume_from_db=True)
    left = {p.name for p in out.iterdir()}
    assert not left & {"report.md", "summary.json", "export", "comparison.jsonl"}
    assert {"annotation.db", "notes.txt", "reward", "ppo"} <= left
    assert json.loads((out / "rankings.kwise.jsonl").read_text())["ranks"] == [1, 0, 2]


def test_a_refused_continue_changes_nothing(tmp_path):
    # a database without rankings: the earlier report, export and summary were deleted before the refusal
    out = tmp_path / "demo"
    earlier_demo(out, rankings_db=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith("annotation.db")}
    with pytest.raises(UserError, match="no rankings in .* yet"):
        run_demo(out, config_path=None, overrides=[f"model={tmp_path / 'no-model'}"], resume_from_db=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith("annotation.db")} == before


@pytest.mark.parametrize("config", ["x: 1\n", "model: gpt2\nseed: 1\n"])  # keys of another tool, some a demo's too
@pytest.mark.parametrize("force", [False, True])
def test_a_folder_that_only_shares_names_with_a_demo_is_not_deleted(tmp_path, force, config):
    # --force deleted a user's `export` folder beside a config.yaml of another tool
    out = tmp_path / "mine"
    (out / "export").mkdir(parents=True)
    (out / "export" / "README.md").write_text("my exported model")
    (out / "config.yaml").write_text(config)
    with pytest.raises(UserError) as info:
        run_demo(out, config_path=None, overrides=[f"model={tmp_path / 'no-model'}"], force=force)
    assert str(info.value) == (f"{out} holds export, config.yaml, and no demo's config.yaml: it is not an earlier "
                               "demo's folder, and the demo would write over them; choose another --out")
    assert sorted(p.name for p in out.rglob("*")) == ["README.md", "config.yaml", "export"]
    assert (out / "config.yaml").read_text() == config


def test_force_does_not_delete_a_database_alone(tmp_path):
    # what an interrupted --serve leaves, or the user's own database: --serve and --continue keep it
    out = tmp_path / "d"
    out.mkdir()
    (out / "annotation.db").write_bytes(b"the user's")
    with pytest.raises(UserError, match="--force deletes an earlier demo only"):
        run_demo(out, config_path=None, overrides=[f"model={tmp_path / 'no-model'}"], force=True)
    assert (out / "annotation.db").read_bytes() == b"the user's"


@pytest.mark.parametrize("method", ["dpo", "ppo", "grpo"])
def test_the_report_shows_the_ppo_curves_only_of_a_run_that_ran_the_ppo_stage(tmp_path, method):
    # `align demo` then `align demo --continue method=dpo`: OUT/ppo still holds the first run's curves,
    # which the DPO run's report embedded as its own
    from align.commands.demo import DemoConfig
    from align.commands.demo_report import write_report

    out = tmp_path / "demo"
    (out / "ppo").mkdir(parents=True)
    for name in ("reward.png", "kl.png"):  # the earlier PPO run's plots
        (out / "ppo" / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    summary = {"demo/method": method, "demo/gold_sft": 0.1, "demo/gold_export": 0.4, "demo/gold_sft_std": 0.5,
               "demo/temperature": 0.9, "eval/kl": 1.0, "eval/accuracy": 0.6, "eval/num_pairs": 10}
    if method != "dpo":
        summary.update({"demo/reward_sft": 0.0, "demo/reward_export": 1.0, "reward/eval_accuracy": 0.7,
                        "reward/eval_num_pairs": 12})
    samples = [dict(prompt=f"p{i}", sft="a", aligned="b", gold_sft=0.1 * i, gold_aligned=0.2 * i) for i in range(4)]
    write_report(out, DemoConfig(method=method), summary, samples)
    report = (out / "report.md").read_text()
    assert "](gold_scores.png)" in report
    if method == "dpo":
        assert "ppo/" not in report and "PPO" not in report and "reward-model" not in report
        assert "implicit reward" in report
    else:
        assert "](ppo/reward.png)" in report and "](ppo/kl.png)" in report and "reward-model score" in report
