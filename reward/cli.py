"""`align reward ...` commands. Only typer and the standard library at module level."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from align.cli_common import ConfigOpt, OverridesArg, ResumeOpt, config_keys_help
from align.errors import UserError

app = typer.Typer(no_args_is_help=True)


def _train_epilog() -> str:
    from reward.config import RewardConfig

    return config_keys_help(RewardConfig)




@app.command("train", epilog=_train_epilog())
def train(config: ConfigOpt = None, overrides: OverridesArg = None, resume: ResumeOpt = None) -> None:
    """Train a reward model on K-wise rankings (InstructGPT loss); writes RUN/{config.yaml,metrics.jsonl,summary.json,model/}."""
    from align.cli_common import resume_hints, resumed_config
    from align.config import load_config
    from align.overrides import warn_given_twice
    from reward.config import RESUME_OVERRIDABLE, RewardConfig
    from reward.train import train_reward_model

    overrides = list(overrides or [])
    warn_given_twice(overrides, RewardConfig)
    cfg = (load_config(RewardConfig, config, overrides) if resume is None
           else resumed_config(RewardConfig, resume, config, overrides, RESUME_OVERRIDABLE, "reward"))
    with resume_hints(resume):
        train_reward_model(cfg, resume=resume is not None)


@app.command("score")
def score(
    model: Annotated[Path, typer.Option("--model", "-m", help="Reward run directory (RUN) or RUN/model.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL with `prompt` (text or messages) and `response` per line.")],
    out: Annotated[
        Path | None, typer.Option("--out", "--output", "-o",
                                  help="Write JSONL here (default: stdout); each input line + `reward`, `reward_raw`.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Responses per forward pass.", min=1)] = 64,
    force: Annotated[bool, typer.Option(help="Replace --out if it already exists (never the --input file or a "
                                             "file of the reward model).")] = False,
) -> None:
    """Score prompt/response pairs in batches with a trained reward model."""
    if out is not None:
        check_score_out(out, input, model, force)
    rows = read_score_input(input)
    from reward.model import load_reward_model

    rm = load_reward_model(model)
    raw = rm.score_raw([r["prompt"] for r in rows], [r["response"] for r in rows], batch_size=batch_size)
    scored = [{**row, "reward": reward, "reward_raw": value}
              for row, reward, value in zip(rows, rm.normalize(raw).tolist(), raw.tolist())]
    if replaced := sum(1 for row in rows if "reward" in row or "reward_raw" in row):  # another model's scores, say
        typer.echo(f"note: {replaced} of the {len(rows)} input lines held a `reward` or `reward_raw` of their own, "
                   "replaced by this model's", err=True)
    if out is None:
        typer.echo("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored), nl=False)
    else:
        from align.run import write_jsonl_atomic

        try:  # never a half-written file where an earlier one was
            write_jsonl_atomic(out, scored)
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
        typer.echo(f"scored {len(rows)} responses -> {out}", err=True)


def check_score_out(out: Path, input: Path, model: Path, force: bool) -> None:
    """--out before anything is read or written: a new file, or with --force one to replace, but never
    the input or a file of a checkpoint the scores come from (a model's config.json overwritten with
    scores would be a model lost)."""
    from align.files import check_output_file
    from align.modeling import adapter_chain
    from reward.run_dir import model_dir

    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out}: " + ("a directory, not a file" if out.is_dir()
                                          else f"its directory {out.parent} does not exist"))
    if out.exists() and input.is_file() and out.samefile(input):
        raise UserError(f"--out {out} is the --input file: choose another --out")
    target = out.resolve()
    for checkpoint in adapter_chain(model_dir(model), find_only=True):  # the model, and an adapter's bases
        if checkpoint.resolve() in target.parents:
            raise UserError(f"--out {out} is inside {checkpoint}, a checkpoint the scores are read from: "
                            "choose another --out")
    if model.resolve() in target.parents:  # a reward run's folder: its config, metrics and summary
        raise UserError(f"--out {out} is inside the run {model} the scores are read from: choose another --out")
    check_output_file(out, force)


def read_score_input(path: Path) -> list[dict]:
    from align.files import jsonl_rows
    from align.formats import check_prompt
    from align.text_checks import refuse_lone_surrogates

    rows = []
    for lineno, row in jsonl_rows(path):
        if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("response"), str):
            raise UserError(f"{path}:{lineno}: each line needs `prompt` and a string `response`")
        check_prompt(row["prompt"], f"{path}:{lineno}")
        # every field is written back beside the reward, and UTF-8 cannot hold a lone surrogate
        rows.append(refuse_lone_surrogates(row, f"{path}:{lineno}"))
    return rows


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Reward run directory (RUN) or RUN/model.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Rankings to evaluate on.")],
    format: Annotated[str, typer.Option("--format", "-f", help="kwise, trl, hh or oasst.")] = "kwise",
    batch_size: Annotated[int, typer.Option(help="Responses per forward pass.", min=1)] = 64,
) -> None:
    """Pairwise accuracy (overall, by K, cross-annotator) of a trained reward model on a rankings file."""
    if format not in ("kwise", "trl", "hh", "oasst"):
        raise UserError(f"--format {format!r} is not one of kwise, trl, hh, oasst")
    from align.files import input_file_problem

    if input_file_problem(data):
        raise UserError(f"--data {input_file_problem(data)}")
    from align.formats import merge_repeated_responses
    from reward.data import read_source, with_pairs
    from reward.evaluate import evaluate_rankings, format_table
    from reward.model import load_reward_model

    read = read_source(format, data)
    if not read:
        raise UserError(no_rankings_problem(data))
    rankings = with_pairs([merge_repeated_responses(r) for r in read])
    if not rankings:
        raise UserError(f"{data}: no ranking states a preference (each is all ties or has one response)")
    rm = load_reward_model(model)
    metrics = evaluate_rankings(rm.model, rm.tokenizer, rankings, max_length=rm.max_length, batch_size=batch_size,
                                gain=rm.gain, rendering=rm.rendering)
    typer.echo(format_table(metrics))
    trained_on, unknown = training_prompts(rm.path)
    if trained_on is None:
        typer.echo(f"note: {unknown}")
    else:
        from reward.data import prompt_key

        seen = sum(prompt_key(r) in trained_on for r in rankings)
        if seen:
            typer.echo(f"note: {seen} of the {len(rankings)} rankings are of prompts the model was trained on, so "
                       "this accuracy is not a held-out one (the run's own is in its summary.json)")


@app.command("import")
def import_model(
    source: Annotated[Path, typer.Argument(help="A sequence-classification checkpoint with one output (a reward model "
                                                "trained elsewhere: TRL, OpenRLHF, the Hub).", show_default=False)],
    policy: Annotated[str, typer.Option("--policy", "-p", help="The SFT checkpoint PPO, RLOO or GRPO will start from "
                                                              "(`demo` for the demo model): the rewards of its samples "
                                                              "are normalised to mean 0, std 1.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Rankings: their prompts are what the policy answers, "
                                                            "and the model's pairwise accuracy is measured on them.")],
    out: Annotated[Path, typer.Option("--out", "--output", "-o", help="The reward model directory to write.")],
    format: Annotated[str, typer.Option("--format", "-f", help="kwise, trl, hh or oasst.")] = "kwise",
    prompts: Annotated[int, typer.Option(help="Prompts the policy answers for the normalisation.", min=2)] = 128,
    response_length: Annotated[int, typer.Option(help="Tokens per sampled answer.", min=1)] = 48,
    max_length: Annotated[int, typer.Option(help="Tokens per prompt+response the model reads; longer texts lose their "
                                                 "start. Cut to the model's position table where it has one.",
                                            min=8)] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the prompt choice and the sampling.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Responses per forward pass.", min=1)] = 64,
    force: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier import or is empty (nothing else "
                                             "is replaced).")] = False,
    rendering: Annotated[str, typer.Option(help="How the model was trained to read a (prompt, response): "
                                                "`conversation`, the whole conversation through its chat template "
                                                "(TRL's reward trainer; without a template, HH-RLHF dialogue); "
                                                "`text_pair`, an encoder's [CLS] question [SEP] response [SEP] "
                                                "(OpenAssistant's DeBERTa and ELECTRA reward models).")] = "conversation",
) -> None:
    """Import a reward model trained elsewhere: normalise it on the policy's samples, measure it on rankings."""
    if format not in ("kwise", "trl", "hh", "oasst"):
        raise UserError(f"--format {format!r} is not one of kwise, trl, hh, oasst")
    from reward.external import import_reward_model

    import_reward_model(source, policy=policy, data=data, format=format, out=out, prompts=prompts,
                        response_length=response_length, max_length=max_length, seed=seed, batch_size=batch_size,
                        force=force, rendering=rendering, echo=typer.echo)


def training_prompts(model_dir: Path) -> tuple[set[str] | None, str]:
    """The prompts (`reward.data.prompt_key`) a reward model was trained on, read again from the data
    its run recorded (RUN/model/reward_model_info.json), and ""; or None and why they cannot be told:
    trained elsewhere, a record without its data, or a rankings file changed since (a re-export after
    more rankings moves the prompt-level split) or gone."""
    import json

    from align.config import from_dict
    from align.errors import UserError
    from reward.config import RewardConfig
    from reward.data import file_digest, load_reward_data, prompt_key
    from reward.run_dir import IMPORTED_FROM, INFO_FILE

    unknown = "so whether these rankings are among those it was trained on cannot be told"
    try:
        info = json.loads((model_dir / INFO_FILE).read_text(encoding="utf-8"))
        config, data = info["config"], info["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{model_dir} records no training data, {unknown}"
    if IMPORTED_FROM in info:
        return None, f"a reward model trained elsewhere ({info[IMPORTED_FROM]}), {unknown}"
    files = {"path": data.get("sha256"), "eval_path": data.get("eval_sha256")}
    for key, digest in files.items():
        if data.get(key) is None:
            continue
        try:
            same = file_digest(data[key]) == digest
        except OSError:
            same = False
        if not same:
            return None, (f"the rankings it was trained on ({data[key]}) have changed since or are gone, {unknown}; "
                          "its run's own held-out accuracy is in its summary.json")
    if data.get("format") == "annotation":
        return None, (f"it was trained on an annotation project, whose rankings may have grown since, {unknown}; "
                      "its run's own held-out accuracy is in its summary.json")
    try:  # the recorded files, whatever folder this runs in
        sections = {**config, "data": {**config.get("data", {}), **{k: data[k] for k in files if data.get(k)}}}
        return {prompt_key(r) for r in load_reward_data(from_dict(RewardConfig, sections).data).train}, ""
    except (OSError, ValueError, KeyError, TypeError, UserError):  # an older model's record
        return None, f"its record of the training data no longer reads, {unknown}"


def no_rankings_problem(data: Path) -> str:
    """Why a rankings file gave no ranking at all, in words true of it (a reader says what it found otherwise:
    an OpenAssistant file without ranked replies)."""
    from align.files import jsonl_rows

    rows = jsonl_rows(data)
    empty = next(rows, None) is None
    rows.close()
    return f"{data} is empty: no rankings to evaluate on" if empty else f"{data}: no rankings in it"
