"""`align demo`: the whole pipeline on the embedded demo model, end to end.

    1. the SFT model      build (or reuse) the demo SFT checkpoint
    2. annotation         a project in OUT/annotation.db; K candidates sampled per prompt
    3. rankings           simulated annotators rank through the web app's own service layer
                          (`--serve` stops here and serves the app so a person can rank;
                          `--continue` picks up from the rankings in the database)
    4. reward model       `align reward train` on the exported K-wise rankings
    5. PPO                `align ppo` against that reward model
    6. export             the aligned policy merged into an ordinary checkpoint (OUT/export)
    7. before / after     SFT vs exported model on held-out prompts, scored by the reward
                          model and by the synthetic task's gold judge; OUT/report.md

`method=rloo|grpo` runs the critic-free methods of the PPO stage in step 5 (configs/demo/rloo.yaml,
grpo.yaml); `method=dpo` replaces steps 4-5 by `align dpo` on the rankings themselves
(configs/demo/dpo.yaml), with no reward model. Every stage writes its own run directory under OUT,
with its resolved config.

An OUT holding an earlier demo is refused unless the user says what to do with it: `--continue`
trains, exports and compares again from the rankings in its annotation database, `--force` starts
over. Either first removes the earlier demo's report, export and summary (and `--force` the rest
of it, the rankings people made included), so that a re-run interrupted half-way leaves no report
describing another policy. `--serve` on an earlier demo serves its database again and removes
nothing.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from align.commands.demo_annotation import PROJECT, export_rankings, fill_project, serve_for_people, simulate_annotators
from align.config import check, check_input_file, load_config, option, save_config
from align.errors import ConfigError, UserError
from align.overrides import parse_override, warn_given_twice
from align.resources import configs_dir
from align.run import make_directory, write_json_atomic, write_jsonl_atomic
from annotation.db_url import SQLITE_COMPANIONS

CONFIGS = configs_dir() / "demo"
DATABASE = "annotation.db"
# What a demo writes into OUT. The results of its last stages first: a re-run removes them before
# anything else, so none survives to describe a policy whose run is being redone.
RESULTS = ("report.md", "summary.json", "export", "comparison.jsonl", "gold_scores.png")
DEMO_FILES = (*RESULTS, "reward", "ppo", "dpo", "rankings.kwise.jsonl", "config.yaml", DATABASE,
              *(DATABASE + tail for tail in SQLITE_COMPANIONS))


@dataclass
class DemoConfig:
    """`align demo` settings. Keys prefixed `reward.` / `ppo.` / `dpo.` override those stages' configs;
    those of a stage the method does not run are checked against its config, then refused."""

    method: Literal["ppo", "rloo", "grpo", "dpo"] = option(
        "ppo", help="The road from the rankings to the policy. ppo: a reward model, then PPO with a value head. "
        "rloo / grpo: the same reward model, then a critic-free method of the PPO stage (4 samples per prompt, no "
        "value model). dpo: no reward model; K-wise DPO (Plackett-Luce) on the rankings themselves. Overrides of a "
        "stage the method does not run (dpo.* with ppo, rloo or grpo; reward.* and ppo.* with dpo) are checked "
        "against that stage's config like the others, then refused: the demo would not use them.")

    model: str = option("demo:tiny", help="SFT checkpoint: demo:tiny, demo:small or a local directory.")
    num_prompts: int = option(
        800, help="Training prompts put up for annotation. With 400 the reward model did not learn relevance "
        "(mismatch loss 0.45) and PPO gave one polite chess answer to 24 of 128 prompts; with 800 (+32 s): "
        "2 of 128.", ge=8)
    k: int = option(4, help="Candidates sampled per prompt (K).", ge=2, le=9)
    num_annotators: int = option(3, help="Simulated annotators.", ge=1)
    annotators_per_prompt: int = option(1, help="Distinct annotators who rank each prompt.", ge=1)
    agreement: float = option(0.73, help="Pairwise agreement between two simulated annotators "
                                         "(InstructGPT measured 72.6%).", gt=0.5, le=1.0)
    response_length: int = option(48, help="Length limit of sampled candidates, in tokens.", ge=4)
    num_eval_prompts: int = option(128, help="Held-out prompts for the before/after comparison.", ge=4)
    reward_config: str = option(str(CONFIGS / "reward.yaml"), help="Reward-model config the demo starts from.",
                                must_exist=True)
    ppo_config: str | None = option(
        None, help="PPO-stage config the demo starts from (method ppo, rloo or grpo); null: configs/demo/METHOD.yaml.")
    dpo_config: str = option(str(CONFIGS / "dpo.yaml"), help="DPO config the demo starts from (method=dpo).",
                             must_exist=True)
    seed: int = option(0, help="Seed for prompts, sampling and annotators.", ge=0, le=2**31 - 1)

    # a former name of a key (an earlier demo folder's config resumes with it)
    key_aliases: ClassVar[dict[str, str]] = {"max_new_tokens": "response_length"}

    def __post_init__(self) -> None:
        check(self.annotators_per_prompt <= self.num_annotators,
              f"annotators_per_prompt ({self.annotators_per_prompt}) exceeds num_annotators ({self.num_annotators})")
        if self.ppo_config is not None:
            check_input_file(self.ppo_config, "ppo_config")

    @property
    def ppo_stage_config(self) -> str:
        """The config of the PPO stage (method ppo, rloo or grpo; configs/demo/ppo.yaml for method=dpo)."""
        return self.ppo_config or str(CONFIGS / f"{'ppo' if self.method == 'dpo' else self.method}.yaml")

    @property
    def policy_config(self) -> str:
        """The config of the stage that trains the policy."""
        return self.dpo_config if self.method == "dpo" else self.ppo_stage_config


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(demo, reward, ppo, dpo) overrides: `reward.x=1` goes to the reward config as `x=1`."""
    demo, reward, ppo, dpo = [], [], [], []
    stages = {"reward.": reward, "ppo.": ppo, "dpo.": dpo}
    for item in overrides:
        prefix = next((p for p in stages if item.startswith(p)), None)
        if prefix is None:
            demo.append(item)
        else:
            stages[prefix].append(item.removeprefix(prefix))
    return demo, reward, ppo, dpo


def refuse_unused_overrides(method: str, reward: list[str], ppo: list[str], dpo: list[str]) -> None:
    """Overrides of a stage `method` does not run would be silently dropped: refuse the first."""
    with_reward_model = "method=ppo/rloo/grpo (the roads with a reward model)"
    unused = ([("reward.", reward, with_reward_model), ("ppo.", ppo, "method=ppo/rloo/grpo")] if method == "dpo"
              else [("dpo.", dpo, "method=dpo")])
    for prefix, items, needs in unused:
        if items:
            key = prefix + items[0].split("=", 1)[0].strip()
            raise ConfigError(f"{key!r} is not used: {prefix}* overrides need {needs}; this demo runs {method}")


def refuse_demo_settings(cfg: DemoConfig, out: Path, stages: dict[str, list[str]]) -> None:
    """The demo sets the models, data, method and run folders of the stages it runs (`stages`: their overrides):
    an override of one would train what the demo does not say it trains. Refuse it, naming the demo's setting."""
    model, method, rankings = f"`model` ({cfg.model})", f"`method` ({cfg.method})", f"rankings ({out / 'rankings.kwise.jsonl'})"
    own = {"reward": {"model.name_or_path": model, "data.format": rankings, "data.path": rankings},
           "dpo": {"policy_model": model, "data.format": rankings, "data.path": rankings},
           "ppo": {"policy_model": model, "method": method, "reward_model": f"reward model ({out / 'reward'})"}}
    for stage, overrides in stages.items():
        governed = {**own[stage], "output_dir": f"--out ({out / stage})", "overwrite": "--continue / --force"}
        for key, value in map(parse_override, overrides):  # a section's mapping (`data={path: x}`) sets each key
            for leaf in [f"{key}.{name}" for name in value.parsed] if isinstance(value.parsed, dict) else [key]:
                if leaf in governed:
                    raise ConfigError(f"{stage}.{leaf} is set by the demo's {governed[leaf]}, not by a {stage}.* override")


def stage_config(stage: str, cls: type, path: Path | None, overrides: list[str]) -> Any:
    """A stage's config from its file and the `STAGE.`-prefixed overrides, its errors naming the stage
    (the stage's own loader names keys without the demo's prefix). A held-out file (data.eval_path) is
    checked too: unlike the demo's rankings, it is there already."""
    try:
        stage_cfg = load_config(cls, path, overrides)
        if getattr(getattr(stage_cfg, "data", None), "eval_path", None) is not None:
            check_input_file(stage_cfg.data.eval_path, "data.eval_path")
        return stage_cfg
    except ConfigError as exc:
        raise ConfigError(f"{stage} stage ({stage}.KEY=VALUE): {exc}") from None


class Stages:
    """Prints one numbered line per stage and records how long each took."""

    def __init__(self, total: int):
        self.total, self.index, self.seconds = total, 0, {}
        self._name, self._t = None, 0.0

    def start(self, name: str, what: str) -> None:
        self.stop()
        self.index += 1
        self._name, self._t = name, time.perf_counter()
        print(f"\n[{self.index}/{self.total}] {what}", flush=True)

    def stop(self) -> None:
        if self._name:
            self.seconds[f"timing/{self._name}_s"] = round(time.perf_counter() - self._t, 1)
            self._name = None


def earlier_demo(out: Path) -> list[str]:
    """What an earlier demo left in `out` (DEMO_FILES' names, in that order); [] for a fresh folder."""
    return [name for name in DEMO_FILES if (out / name).exists() or (out / name).is_symlink()]


def holds_demo_config(out: Path) -> bool:
    """Whether `out`'s config.yaml is a demo's: a folder whose names merely match (an `export` of the
    user's, another tool's config.yaml) is not an earlier demo, and nothing in it is the demo's to delete."""
    from align.config import read_yaml_mapping

    try:
        mapping = read_yaml_mapping(out / "config.yaml")
    except ConfigError:
        return False
    # a demo writes every key (the earliest demos had these four already); another file with a key or two of
    # the same names (`model`, `seed`) is not one
    return (set(mapping) <= {f.name for f in fields(DemoConfig)}
            and {"num_prompts", "k", "num_annotators", "agreement"} <= set(mapping))


def check_earlier_demo(out: Path, *, force: bool, resume_from_db: bool, serve: bool) -> list[str]:
    """The earlier demo in `out` that this run may redo (its names, as `earlier_demo`), or a refusal:
    without --continue, --force or --serve; where the names are not a demo's (no demo config.yaml);
    and --force where only a database is there (as an interrupted --serve leaves it: --serve and
    --continue keep it, and it may be the user's own)."""
    earlier = earlier_demo(out)
    if not earlier:
        return []
    shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
    ours = holds_demo_config(out)
    database_only = all(name.startswith(DATABASE) for name in earlier)
    if not (ours or database_only):
        raise UserError(f"{out} holds {shown}, and no demo's config.yaml: it is not an earlier demo's folder, and "
                        "the demo would write over them; choose another --out")
    if force and not ours:
        raise UserError(f"{out} holds {shown} and no demo's config.yaml: --force deletes an earlier demo only; "
                        "remove it yourself, or choose another --out")
    # --serve on an earlier demo serves its database again: it adds the prompts and candidates it lacks
    # (the import adds nothing twice) and removes nothing, the rankings people made least of all
    if not (force or resume_from_db or serve):
        deletes = f"deletes it, {DATABASE} and its rankings included" if DATABASE in earlier else "deletes it"
        start_over = f", or --force to start over ({deletes})" if ours else ""
        raise UserError(f"{out} holds an earlier demo ({shown}): pass --continue to train again from its rankings"
                        f"{start_over}, or choose another --out")
    return earlier


def remove_earlier_demo(out: Path, names: list[str]) -> None:
    """Remove `names` from `out`, in DEMO_FILES' order (the results first)."""
    for name in names:
        path = out / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(f"cannot remove the earlier demo's {path}: {exc.strerror or exc}") from None


def run_demo(out: Path, *, config_path: Path | None, overrides: list[str], serve: bool = False,
             resume_from_db: bool = False, force: bool = False, host: str = "127.0.0.1",
             port: int = 8000) -> dict[str, Any]:
    from dpo.config import DPOConfig
    from ppo.config import PPOConfig
    from reward.config import RewardConfig

    check(not (serve and resume_from_db), "--serve and --continue exclude each other")
    check(not (force and resume_from_db), "--force and --continue exclude each other: --force starts over, "
                                          "--continue keeps the rankings")
    demo_over, reward_over, ppo_over, dpo_over = split_overrides(overrides)
    for given, cls in ((demo_over, DemoConfig), (reward_over, RewardConfig), (ppo_over, PPOConfig),
                       (dpo_over, DPOConfig)):
        warn_given_twice(given, cls)
    cfg = load_config(DemoConfig, config_path, demo_over)
    with_reward_model = cfg.method != "dpo"
    out = Path(out).resolve()
    db_url = f"sqlite:///{out / 'annotation.db'}"
    if resume_from_db and not (out / "annotation.db").exists():
        raise UserError(f"nothing to continue: {out / 'annotation.db'} does not exist (run `align demo --serve` first)")
    rankings_path = out / "rankings.kwise.jsonl"
    # An earlier demo in OUT is refused below unless --continue, --force or --serve: the stages' runs
    # are then redone in place (--serve runs none of them).
    reward_base = [f"output_dir={out / 'reward'}", f"model.name_or_path={cfg.model}", "overwrite=true"]
    rankings_data = ["data.format=kwise", f"data.path={rankings_path}"]
    dpo_base = [f"output_dir={out / 'dpo'}", f"policy_model={cfg.model}", "overwrite=true"]
    refuse_demo_settings(cfg, out, {"reward": reward_over, "ppo": ppo_over} if with_reward_model else {"dpo": dpo_over})
    # Validate every stage's config before spending minutes on the first one (their data keys wait for the rankings
    # file); a stage the method does not run is validated too where it has overrides, which are then refused.
    if with_reward_model or reward_over:
        stage_config("reward", RewardConfig, cfg.reward_config, [*reward_base, *reward_over])
    if with_reward_model or ppo_over:
        ppo_cfg = stage_config("ppo", PPOConfig, cfg.ppo_stage_config, [
            f"output_dir={out / 'ppo'}", f"policy_model={cfg.model}", f"reward_model={out / 'reward'}",
            "overwrite=true", *([f"method={cfg.method}"] if with_reward_model else []), *ppo_over])
    if not with_reward_model or dpo_over:
        dpo_cfg = stage_config("dpo", DPOConfig, cfg.dpo_config, [*dpo_base, "data.format=synthetic", *dpo_over])
    refuse_unused_overrides(cfg.method, reward_over, ppo_over, dpo_over)
    policy_cfg = ppo_cfg if with_reward_model else dpo_cfg
    earlier = check_earlier_demo(out, force=force, resume_from_db=resume_from_db, serve=serve)
    # --continue reads the rankings before anything goes: a database it cannot train from changes nothing
    rankings = export_rankings(db_url, rankings_path) if resume_from_db else None
    if force:
        remove_earlier_demo(out, earlier)
    elif resume_from_db:  # the rankings stay; what the stages after them made goes first
        remove_earlier_demo(out, [name for name in earlier if name in RESULTS])
    make_directory(out)
    if not serve:  # --serve writes it once the project took these settings (below)
        save_config(cfg, out / "config.yaml")

    stages = Stages(3 if serve else 7 if with_reward_model else 6)
    t0 = time.perf_counter()
    if not resume_from_db:
        stages.start("sft", f"SFT model: {cfg.model}")
        from align.modeling import resolve_model_path

        model_path = resolve_model_path(cfg.model)
        print(f"    {model_path}")
        stages.start("annotation", f"annotation project {PROJECT!r} in {out / 'annotation.db'}: "
                                   f"{cfg.num_prompts} prompts x {cfg.k} candidates")
        sessions = fill_project(db_url, cfg)
        if serve:
            save_config(cfg, out / "config.yaml")
            stages.stop()
            serve_for_people(db_url, out, host, port)
            return {}
        stages.start("rankings", f"{cfg.num_annotators} simulated annotators rank through the web app's service layer "
                                 f"(agreement {cfg.agreement:.0%})")
        counts = simulate_annotators(sessions, cfg)
        print(f"    {counts['rankings']} rankings stored")
        rankings = export_rankings(db_url, rankings_path)
    else:
        stages.index = 3
    print(f"    {len(rankings)} rankings exported to {rankings_path}")

    reward_summary: dict[str, Any] = {}
    if with_reward_model:
        from ppo.trainer import run_ppo
        from reward.train import train_reward_model

        stages.start("reward", f"reward model on {len(rankings)} K-wise rankings -> {out / 'reward'}")
        reward_cfg = load_config(RewardConfig, cfg.reward_config, [*reward_base, *rankings_data, *reward_over])
        reward_summary = train_reward_model(reward_cfg)
        stages.start("ppo", f"{policy_cfg.method.upper()} on LoRA against the reward model -> {out / 'ppo'}")
        policy_summary, policy_run = run_ppo(policy_cfg), out / "ppo"
    else:
        from dpo.train import run_dpo

        stages.start("dpo", f"K-wise DPO on LoRA on the {len(rankings)} rankings -> {out / 'dpo'}")
        policy_summary = run_dpo(load_config(DPOConfig, cfg.policy_config, [*dpo_base, *rankings_data, *dpo_over]))
        policy_run = out / "dpo"

    stages.start("export", f"export the aligned policy (merged) -> {out / 'export'}")
    from align.commands.export import export_run

    export_run(policy_run, out / "export", merge=True, force=True)

    stages.start("compare", f"SFT vs exported model on {cfg.num_eval_prompts} held-out prompts")
    # sampled as the policy stage's own evaluation samples (its temperature and response length),
    # so the exported model is judged on the distribution the stage optimised
    comparison = compare_models(cfg, out, temperature=policy_cfg.temperature,
                                max_new_tokens=policy_cfg.response_length, with_reward_model=with_reward_model)
    stages.stop()

    summary = {k: v for k, v in policy_summary.items() if k.startswith("eval/")}
    summary.update(comparison["metrics"])
    summary.update({
        "demo/method": cfg.method,
        "reward/eval_accuracy": reward_summary.get("eval/accuracy"),
        "reward/eval_num_pairs": reward_summary.get("eval/num_pairs"),
        "reward/eval_label_source": reward_summary.get("eval/label_source"),  # whose held-out labels it is scored on
        "data/rankings": len(rankings),
        **stages.seconds,
        "timing/total_s": round(time.perf_counter() - t0, 1),
    })
    write_json_atomic(out / "summary.json", summary)
    from align.commands.demo_report import print_table, write_report

    write_report(out, cfg, summary, comparison["samples"])
    print_table(summary, comparison["samples"])
    print(f"\nreport: {out / 'report.md'}   exported model: {out / 'export'}")
    return summary


# --------------------------------------------------------------------------- comparison


def compare_models(cfg: DemoConfig, out: Path, *, temperature: float, max_new_tokens: int,
                   with_reward_model: bool = True) -> dict[str, Any]:
    """Sample SFT and exported model (plain transformers) on held-out prompts; score both with the
    gold judge, and with the reward model where the road trained one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.generation import generate_responses
    from align.modeling import load_causal_lm, load_tokenizer, resolve_model_path
    from align.synthetic import gold_score, make_prompts
    from reward.model import load_reward_model

    prompts = make_prompts(cfg.num_eval_prompts, seed=cfg.seed + 1, split="heldout")
    sft_path = resolve_model_path(cfg.model)
    sft_tok = load_tokenizer(sft_path)
    sft = load_causal_lm(sft_path, tokenizer=sft_tok)
    exported = AutoModelForCausalLM.from_pretrained(out / "export", local_files_only=True)
    exp_tok = AutoTokenizer.from_pretrained(out / "export", local_files_only=True)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=cfg.seed + 1, batch_size=64)
    before = [s[0] for s in generate_responses(sft, sft_tok, prompts, **kwargs)]
    after = [s[0] for s in generate_responses(exported, exp_tok, prompts, **kwargs)]
    metrics: dict[str, Any] = {}
    if with_reward_model:
        rm = load_reward_model(out / "reward")
        metrics["demo/reward_sft"] = statistics.fmean(rm.score(prompts, before).tolist())
        metrics["demo/reward_export"] = statistics.fmean(rm.score(prompts, after).tolist())
    gold_before = [gold_score(p, r) for p, r in zip(prompts, before)]
    gold_after = [gold_score(p, r) for p, r in zip(prompts, after)]
    metrics.update({
        "demo/gold_sft": statistics.fmean(gold_before),
        "demo/gold_export": statistics.fmean(gold_after),
        "demo/gold_sft_std": statistics.stdev(gold_before),  # the sample std, as the policy stage's eval/gold_sft_std
        "demo/num_eval_prompts": len(prompts),
        "demo/temperature": temperature,
    })
    samples = [dict(prompt=p, sft=a, aligned=b, gold_sft=ga, gold_aligned=gb)
               for p, a, b, ga, gb in zip(prompts, before, after, gold_before, gold_after)]
    write_jsonl_atomic(out / "comparison.jsonl", samples)
    return {"metrics": metrics, "samples": samples}
