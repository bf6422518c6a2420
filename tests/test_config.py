"""The config system: YAML first, then key=value overrides; every mistake is one clear line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from align.config import ConfigError, all_keys, check, describe, foreign_keys, load_config, option, read_yaml_mapping, save_config


@dataclass
class OptimConfig:
    lr: float = option(1e-5, help="Learning rate.", gt=0)
    warmup_steps: int = option(0, help="Linear warm-up steps.", ge=0)


@dataclass
class StageConfig:
    model: str = option("demo", help="Model checkpoint.")
    kl_coef: float = option(0.05, help="KL penalty coefficient.", ge=0)
    clip: float = option(0.2, help="Clip range.", ge=0, lt=1)
    estimator: Literal["k1", "k3"] = option("k1", help="KL estimator.")
    whiten: bool = option(True, help="Whiten advantages.")
    data_path: str | None = option(None, help="Data file.", must_exist=True)
    layers: list[int] = option(default_factory=lambda: [0, 1], help="Layers.")
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer."})

    def __post_init__(self) -> None:
        check(self.optim.warmup_steps < 1000, "optim.warmup_steps must be below 1000")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "kl_coef: 0.2\noptim:\n  lr: 0.001\n")
    cfg = load_config(StageConfig, path, ["optim.lr=3e-4", "estimator=k3", "whiten=false", "layers=[2, 3]"])
    assert cfg.kl_coef == 0.2  # from YAML
    assert cfg.optim.lr == pytest.approx(3e-4)  # override wins over YAML; '3e-4' parsed as a float
    assert cfg.estimator == "k3" and cfg.whiten is False and cfg.layers == [2, 3]
    assert cfg.optim.warmup_steps == 0  # untouched default


def test_a_text_field_takes_the_override_as_typed(tmp_path):
    cfg = load_config(StageConfig, None, [f"model={tmp_path}/run #2", "estimator=k3", "kl_coef=1e-2", "layers=[4]"])
    assert cfg.model == f"{tmp_path}/run #2"  # no YAML comment
    assert cfg.kl_coef == pytest.approx(0.01) and cfg.layers == [4]  # numbers and lists still read as YAML
    assert load_config(StageConfig, None, ["model=2024-12-05"]).model == "2024-12-05"  # no date
    assert load_config(StageConfig, None, ["model=on"]).model == "on"  # no boolean
    assert load_config(StageConfig, None, ["model='run #2'"]).model == "run #2"  # quotes are YAML's, as before
    assert load_config(StageConfig, None, ['model=""']).model == ""
    assert load_config(StageConfig, None, ["model=runs/a: b"]).model == "runs/a: b"  # no mapping
    dated = tmp_path / "2024-12-05"
    dated.write_text("x")
    assert load_config(StageConfig, None, [f"data_path={dated}"]).data_path == str(dated)  # str | None
    assert load_config(StageConfig, None, ["data_path=null"]).data_path is None
    assert load_config(StageConfig, None, ["optim={lr: 0.5}", "optim.warmup_steps=3"]).optim == OptimConfig(0.5, 3)


def test_defaults_without_a_file():
    cfg = load_config(StageConfig, None, [])
    assert cfg == StageConfig()
    assert load_config(StageConfig, None, ["clip=0", "optim.lr=1e-12"]).clip == 0  # and just inside is in


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["kl_coeff=0.1"], "unknown config key 'kl_coeff' for StageConfig; did you mean 'kl_coef'?"),
        (["optim.lrr=0.1"], "did you mean 'optim.lr'?"),
        (["lr=0.1"], "did you mean 'optim.lr'?"),  # a leaf named without its section
        (["train.kl_coef=0.1"], "unknown config key 'train.kl_coef' for StageConfig; did you mean 'kl_coef'?"),  # a
        # leaf under a section this config does not have (another stage nests it)
        (["optim.lr=-0.001"], "optim.lr: must be > 0, got -0.001"),
        (["kl_coef=abc"], "kl_coef: expected a number, got 'abc'"),
        (["kl_coef=inf"], "kl_coef: expected a finite number, got 'inf'"),  # no bound check lets it through
        (["optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),  # YAML's spelling
        (["kl_coef=nan"], "kl_coef: expected a finite number, got 'nan'"),
        (["optim.warmup_steps=1.5"], "optim.warmup_steps: expected an integer"),
        (["optim.warmup_steps=true"], "optim.warmup_steps: expected an integer"),  # YAML's true is no 1
        (["optim.lr=true"], "optim.lr: expected a number"),
        (["optim.lr=0"], "optim.lr: must be > 0, got 0"),  # the bounds themselves are outside
        (["clip=1"], "clip: must be < 1, got 1"),
        (["whiten=maybe"], "whiten: expected true or false"),
        (["estimator=k2"], "estimator: 'k2' is not one of 'k1', 'k3'"),
        (["data_path=/no/such/file.jsonl"], "data_path: file not found: /no/such/file.jsonl"),
        (["data_path=/"], "data_path: / is a directory, not a file"),
        (["optim=3"], "optim: expected a section"),
        (["kl_coef"], "override 'kl_coef' is not of the form key=value"),
        (["optim.warmup_steps=5000"], "optim.warmup_steps must be below 1000"),
    ],
)
def test_bad_values_are_refused_with_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(StageConfig, None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(StageConfig, tmp_path / "nope.yaml", [])
    with pytest.raises(ConfigError, match=rf"^config {tmp_path} is a directory, not a file$"):
        load_config(StageConfig, tmp_path, [])  # a config folder given for its file
    with pytest.raises(ConfigError, match=r"invalid YAML \(line 2"):
        load_config(StageConfig, write(tmp_path, "kl_coef: 0.1\n  bad: [\n"), [])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(StageConfig, write(tmp_path, "- 1\n- 2\n"), [])


def test_a_mapping_for_a_section_sets_its_keys_and_keeps_the_others(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.001\n  warmup_steps: 5\n")
    assert load_config(StageConfig, path, ["optim={lr: 0.5}"]).optim == OptimConfig(0.5, 5)  # the YAML's warm-up kept
    assert load_config(StageConfig, path, ["optim.warmup_steps=7", "optim={lr: 0.5}"]).optim == OptimConfig(0.5, 7)
    assert load_config(StageConfig, path, ["optim={}"]).optim == OptimConfig(0.001, 5)
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(StageConfig, path, ["optim={lrr: 0.5}"])
    assert load_config(RenamedConfig, path, ["optim={learning_rate: 0.5}"]).optim == OptimConfig(0.5, 5)  # an alias


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["kl_coef=0.1", "kl_coef=0.2"], "'kl_coef' is given twice ('kl_coef=0.1', then 'kl_coef=0.2'): the last is taken"),
        (["optim.lr=0.1", "optim={lr: 0.2}"], "'optim.lr' is given twice ('optim.lr=0.1', then 'optim={lr: 0.2}')"),
        (["beta=0.1", "kl_coef=0.2"], "'kl_coef' is given twice ('beta=0.1', then 'kl_coef=0.2')"),  # two names
        (["whiten=true", "whiten=false"], "'whiten' is given twice ('whiten=true', then 'whiten=false')"),
    ],
)
def test_a_setting_the_user_gives_two_values_takes_the_last_and_says_so(overrides, expected, caplog):
    from align.overrides import warn_given_twice

    with caplog.at_level("WARNING", logger="align"):
        warn_given_twice(overrides, RenamedConfig)
    assert caplog.text.count("given twice") == 1 and f"config key {expected}" in caplog.text
    last = load_config(RenamedConfig, None, overrides)
    assert (last.kl_coef, last.optim.lr, last.whiten) in {(0.2, 1e-5, True), (0.05, 0.2, True), (0.05, 1e-5, False)}
    caplog.clear()
    with caplog.at_level("WARNING", logger="align"):  # one value, or the same one again: nothing to say
        warn_given_twice(["kl_coef=0.1", "optim.lr=0.2", "optim={warmup_steps: 3}", "kl_coef=0.1"], RenamedConfig)
    assert "given twice" not in caplog.text


def test_of_a_command_s_own_settings_and_the_user_s_the_last_wins():
    assert load_config(RenamedConfig, None, ["beta=0.1", "kl_coef=0.2"]).kl_coef == 0.2


def test_unknown_key_in_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'estimator'"):
        load_config(StageConfig, write(tmp_path, "estimater: k3\n"), [])


@dataclass
class RenamedConfig(StageConfig):
    key_aliases: ClassVar[dict[str, str]] = {"beta": "kl_coef", "optim.learning_rate": "optim.lr"}


def test_a_key_given_under_another_name_sets_the_key_and_says_so(tmp_path, caplog):
    old_run = write(tmp_path, "beta: 0.3\noptim:\n  learning_rate: 0.002\n  warmup_steps: 5\n")
    with caplog.at_level("WARNING", logger="align"):
        cfg = load_config(RenamedConfig, old_run, [])
    assert cfg.kl_coef == 0.3 and cfg.optim.lr == 0.002 and cfg.optim.warmup_steps == 5
    assert "'beta' is read as 'kl_coef'" in caplog.text and "'optim.learning_rate' is read as 'optim.lr'" in caplog.text
    # an override under either name wins over the file's value
    assert load_config(RenamedConfig, old_run, ["optim.learning_rate=1e-4"]).optim.lr == 1e-4
    assert load_config(RenamedConfig, old_run, ["kl_coef=0.5"]).kl_coef == 0.5
    # the run directory records the key's own name, and loads back equal
    saved = read_yaml_mapping(save_config(cfg, tmp_path / "run" / "config.yaml"))
    assert saved["kl_coef"] == 0.3 and "beta" not in saved and saved["optim"]["lr"] == 0.002
    # one setting under both names in one file is refused, naming both
    with pytest.raises(ConfigError, match="'beta' and 'kl_coef' are one setting; give 'kl_coef' only"):
        load_config(RenamedConfig, write(tmp_path, "beta: 0.3\nkl_coef: 0.1\n"), [])
    # a class without aliases still refuses the name
    with pytest.raises(ConfigError, match="unknown config key 'beta'"):
        load_config(StageConfig, None, ["beta=0.3"])


def test_the_stages_former_key_names_are_read_as_their_keys():
    from align.commands.demo import DemoConfig
    from dpo.config import DPOConfig
    from ppo.config import PPOConfig
    from reward.config import RewardConfig

    assert load_config(RewardConfig, None, ["eval.normalize_max_new_tokens=7", "data.annotators=2"]).eval.normalize_response_length == 7
    assert load_config(DPOConfig, None, ["data.annotators=2", "max_new_tokens=9"]).data.annotators_per_prompt == 2
    ppo = load_config(PPOConfig, None, ["cliprange=0.1", "cliprange_value=0.3", "max_new_tokens=9"])
    assert ppo.clip_coef == 0.1 and ppo.vf_clip_coef == 0.3 and ppo.response_length == 9
    assert load_config(DemoConfig, None, ["max_new_tokens=16"]).response_length == 16
    for cls in (RewardConfig, DPOConfig, PPOConfig, DemoConfig):  # every alias names a key of its class
        assert set(cls.key_aliases.values()) <= set(all_keys(cls)), cls


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(StageConfig, None, ["kl_coef=0.3", "optim.lr=2e-5", "layers=[5]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(StageConfig, path, []) == cfg


def test_every_field_is_documented():
    rows = describe(StageConfig)
    assert {r[0] for r in rows} >= {"kl_coef", "optim.lr", "optim.warmup_steps"}
    assert all(r[3] for r in rows)


@pytest.mark.parametrize("stage", ["reward", "ppo", "rloo", "grpo", "dpo"])
def test_the_shipped_real_model_configs_load(stage, tmp_path):
    # every key of configs/real/*.yaml is one its stage knows; only the files a user points them at
    # are stood in for here
    from pathlib import Path

    from dpo.config import DPOConfig
    from ppo.config import PPOConfig
    from reward.config import RewardConfig

    rankings, prompts = tmp_path / "rankings.jsonl", tmp_path / "prompts.jsonl"
    rankings.write_text("")
    prompts.write_text("")
    stand_ins = {"reward": (RewardConfig, [f"data.path={rankings}"]),
                 "ppo": (PPOConfig, [f"prompts={prompts}", f"eval_prompts={prompts}"]),
                 "rloo": (PPOConfig, [f"prompts={prompts}", f"eval_prompts={prompts}"]),
                 "grpo": (PPOConfig, [f"prompts={prompts}", f"eval_prompts={prompts}"]),
                 "dpo": (DPOConfig, [f"data.path={rankings}", f"eval_prompts={prompts}"])}
    config_class, overrides = stand_ins[stage]
    path = Path(__file__).resolve().parents[1] / "configs" / "real" / f"{stage}.yaml"
    cfg = load_config(config_class, path, overrides)
    assert cfg.output_dir == f"runs/real/{stage}"
    if config_class is PPOConfig:
        assert cfg.method == stage


@pytest.mark.parametrize("stage", ["ppo", "dpo"])
def test_held_out_prompts_are_needed_only_where_the_run_samples_them(stage, tmp_path):
    from dpo.config import DPOConfig
    from ppo.config import PPOConfig

    rankings, prompts, missing = tmp_path / "rankings.jsonl", tmp_path / "prompts.jsonl", tmp_path / "heldout.jsonl"
    rankings.write_text("")
    prompts.write_text("")
    config_class, given = {"ppo": (PPOConfig, [f"prompts={prompts}"]), "dpo": (DPOConfig, ["data.format=kwise", f"data.path={rankings}"])}[stage]
    with pytest.raises(ConfigError, match=f"eval_prompts: file not found: {missing}"):
        load_config(config_class, None, [*given, f"eval_prompts={missing}"])
    assert load_config(config_class, None, [*given, f"eval_prompts={missing}", "num_eval_prompts=0"]).num_eval_prompts == 0


def test_a_shipped_config_is_found_from_any_folder_as_the_readme_names_it(tmp_path, monkeypatch):
    from align.errors import ConfigError
    from ppo.config import PPOConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("")
    stand_ins = ["prompts=prompts.jsonl", "eval_prompts=prompts.jsonl"]
    assert load_config(PPOConfig, "configs/real/grpo.yaml", stand_ins).method == "grpo"  # none here: align's own
    with pytest.raises(ConfigError, match="config file not found: configs/real/nope.yaml"):
        load_config(PPOConfig, "configs/real/nope.yaml", stand_ins)
    mine = tmp_path / "configs" / "real" / "grpo.yaml"  # a file of that name here comes first
    mine.parent.mkdir(parents=True)
    mine.write_text("method: rloo\nsamples_per_prompt: 2\n")
    assert load_config(PPOConfig, "configs/real/grpo.yaml", stand_ins).method == "rloo"


@pytest.mark.parametrize("config_set", ["demo", "real"])
def test_the_shipped_dpo_configs_hold_out_the_prompts_the_reward_configs_do(config_set, tmp_path):
    # the two roads' held-out accuracies compare only on the same held-out prompts: the same data
    # section's split (fraction, seed, held-out file) in the reward and DPO configs of one set
    from pathlib import Path

    from dpo.config import DPOConfig
    from reward.config import RewardConfig

    folder = Path(__file__).resolve().parents[1] / "configs" / config_set
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("")
    split = ("eval_fraction", "seed", "eval_path")
    reward = load_config(RewardConfig, folder / "reward.yaml", ["data.format=kwise", f"data.path={rankings}"]).data
    dpo = load_config(DPOConfig, folder / "dpo.yaml", [f"data.path={rankings}", f"eval_prompts={rankings}"]).data
    assert [getattr(dpo, k) for k in split] == [getattr(reward, k) for k in split]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kl_coef: 0.1\nwhiten: true\nkl_coef: 0.2\n", "line 3, column 1): duplicate key 'kl_coef' (first on line 1)"),
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "line 3, column 3): duplicate key 'lr' (first on line 2)"),
        ("optim: {lr: 0.1, lr: 0.2}\n", "line 1, column 18): duplicate key 'lr' (first on line 1)"),
    ],
)
def test_a_duplicate_key_in_yaml_is_refused_with_its_line(tmp_path, text, expected):
    # PyYAML keeps the last value of a repeated key; the first one would be silently ignored
    with pytest.raises(ConfigError) as info:
        load_config(StageConfig, write(tmp_path, text), [])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_yaml_merge_keys_still_override(tmp_path):
    # `<<:` merges a mapping whose keys the explicit ones replace: no duplicate
    path = write(tmp_path, "base: &b {lr: 0.1, warmup_steps: 2}\noptim:\n  <<: *b\n  lr: 0.5\n")
    assert read_yaml_mapping(path)["optim"] == {"lr": 0.5, "warmup_steps": 2}


def test_a_dotted_key_in_yaml_is_refused_with_the_nested_form(tmp_path):
    # a dotted key is the command line's way to name a nested key; YAML nests sections
    with pytest.raises(ConfigError) as info:
        load_config(StageConfig, write(tmp_path, "optim.lr: 0.1\n"), [])
    assert str(info.value) == (f"{tmp_path / 'c.yaml'}: 'optim.lr': dotted keys are for key=value overrides; "
                               "in a YAML file write it as a nested section (optim:, then lr: indented below it)")
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):  # an unknown dotted key stays unknown
        load_config(StageConfig, write(tmp_path, "optim.lrr: 0.1\n"), [])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["kl_coef.x=1"], "kl_coef is not a section (it takes float), so 'kl_coef.x' is no config key"),
        (["optim.lr.a.b=1"], "optim.lr is not a section (it takes float), so 'optim.lr.a' is no config key"),
        (["estimator.x=k1"], "estimator is not a section (it takes k1|k3), so 'estimator.x' is no config key"),
        (["data_path.x=1"], "data_path is not a section (it takes str | null), so 'data_path.x' is no config key"),
    ],
)
def test_a_dotted_key_under_a_leaf_says_it_is_not_a_section(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(StageConfig, None, overrides)
    assert str(info.value) == expected  # no internal repr of the override


def test_a_yaml_section_for_a_leaf_says_it_is_not_a_section(tmp_path):
    with pytest.raises(ConfigError, match=r"^kl_coef is not a section \(it takes float\), so 'kl_coef.x' is no config key$"):
        load_config(StageConfig, write(tmp_path, "kl_coef:\n  x: 1\n"), [])


def test_a_path_under_the_home_directory_is_expanded(tmp_path, monkeypatch):
    # as a shell would: `data.path=~/k.jsonl` in quotes, or in a YAML file, reaches the loader unexpanded
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "k.jsonl").write_text("")
    cfg = load_config(StageConfig, write(tmp_path, "model: ~/models/sft\n"), ["data_path=~/k.jsonl"])
    assert cfg.data_path == str(tmp_path / "k.jsonl") and cfg.model == str(tmp_path / "models" / "sft")
    assert load_config(StageConfig, None, ["model=~"]).model == str(tmp_path)  # a text that cannot be null
    assert load_config(StageConfig, None, ["data_path=~"]).data_path is None  # YAML's null, as in a file
    assert load_config(StageConfig, None, ["model=~sft/x"]).model == "~sft/x"  # only ~ and ~/ name the home
    assert load_config(StageConfig, None, ["model=runs/~/x"]).model == "runs/~/x"


def test_a_stage_reads_its_data_from_the_home_directory(tmp_path, monkeypatch):
    from pathlib import Path

    from dpo.config import DPOConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "k.jsonl").write_text("")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo" / "dpo.yaml"
    cfg = load_config(DPOConfig, demo, ["data.format=kwise", "data.path=~/k.jsonl", "output_dir=~/runs/dpo"])
    assert cfg.data.path == str(tmp_path / "k.jsonl") and cfg.output_dir == str(tmp_path / "runs" / "dpo")


def test_a_resumed_run_may_change_a_setting_given_under_its_former_name(tmp_path):
    from align.cli_common import resumed_config
    from reward.config import RESUME_OVERRIDABLE, RewardConfig

    run = tmp_path / "run"
    save_config(load_config(RewardConfig, None, [f"output_dir={run}"]), run / "config.yaml")
    cfg = resumed_config(RewardConfig, run, None, ["eval.normalize_max_new_tokens=16"], RESUME_OVERRIDABLE, "reward")
    assert cfg.eval.normalize_response_length == 16


@pytest.mark.parametrize("stage, other", [("ppo", "reward"), ("dpo", "ppo"), ("reward", "dpo")])
def test_another_stages_config_file_is_named_as_such(stage, other):
    # not a "did you mean" for the first of its keys: a reward config given to PPO drew "did you mean 'ref_model'?"
    from align.resources import configs_dir
    from dpo.config import DPOConfig
    from ppo.config import PPOConfig
    from reward.config import RewardConfig

    cls = {"ppo": PPOConfig, "dpo": DPOConfig, "reward": RewardConfig}[stage]
    path = configs_dir() / "demo" / f"{other}.yaml"
    with pytest.raises(ConfigError, match=rf"{path}: not a config of this command \({cls.__name__}\): it sets '"):
        load_config(cls, path, [])
    assert foreign_keys(cls, configs_dir() / "demo" / f"{stage}.yaml") == []  # its own has none
