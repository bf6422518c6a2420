"""The `align` command line.

Each stage lives in its own package and contributes its commands here; this module only
wires them together. Heavy libraries (torch, transformers, FastAPI) are imported inside
the commands, never at module level, so `align --help` answers at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from align.cli_common import ConfigOpt, OverridesArg, config_keys_help
from align.errors import UserError

COMMAND_ORDER = ("annotate", "reward", "ppo", "dpo", "export", "demo", "memory-plan", "init-demo-model")


class _PipelineOrder(typer.core.TyperGroup):
    """--help lists the commands in the pipeline's order (Typer's documented way to order them)."""

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda name: COMMAND_ORDER.index(name) if name in COMMAND_ORDER else 99)


app = typer.Typer(
    name="align",
    cls=_PipelineOrder,
    help="RLHF pipeline: rank responses in a browser, then align an SFT checkpoint on LoRA adapters from the "
    "rankings (a K-wise reward model and PPO, RLOO or GRPO; or DPO on the rankings themselves) and export it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _register_stages() -> None:
    # Imported here, not above, so a stage's CLI module stays the only place that knows
    # its commands; each of these modules imports only typer and the standard library.
    # Once per process: `main` called again (in process, as the tests do) would add every
    # command again, and typer builds each copy on every later call.
    if app.registered_commands:
        return
    from align.commands.memory_plan import memory_plan_command
    from align.commands.sources import register_ranking_sources
    from annotation.cli import app as annotate_app
    from dpo.cli import dpo_command
    from dpo.config import DPOConfig
    from ppo.cli import ppo_command
    from ppo.config import PPOConfig
    from reward.cli import app as reward_app

    register_ranking_sources()  # reward training reads annotation projects (data.format=annotation)
    # the pipeline's stages in --help, then the tools around them
    stage, tool = {"rich_help_panel": "Stages"}, {"rich_help_panel": "Tools"}
    app.add_typer(annotate_app, name="annotate", help="Annotation web app: serve, import, generate, export.", **stage)
    app.add_typer(reward_app, name="reward", help="Reward model: train on K-wise rankings, evaluate, score; import one trained elsewhere.", **stage)
    app.command("ppo", **stage, help="Align an SFT checkpoint with PPO (or RLOO, GRPO: `method=`) on LoRA adapters "
                "against a reward model.", epilog=config_keys_help(PPOConfig))(ppo_command)
    app.command("dpo", **stage, help="Align an SFT checkpoint on the rankings directly: DPO under the Plackett-Luce model "
                "(K-wise, ties kept) or on the pairs cut from them, on LoRA adapters.",
                epilog=config_keys_help(DPOConfig))(dpo_command)
    app.command("export", **stage)(export)
    app.command("demo", epilog=_demo_epilog(), **tool)(demo)
    app.command("memory-plan", **tool)(memory_plan_command)  # the memory plan of a stage for a model shape
    app.command("init-demo-model", **tool)(init_demo_model)


def init_demo_model(
    out: Annotated[
        Path | None, typer.Option(help="Directory to write the checkpoint to (default: the align cache).")
    ] = None,
    size: Annotated[str, typer.Option(help="tiny (about 1M parameters) or small (about 5M).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed for data, tokenizer and weights.")] = 0,
    force: Annotated[bool, typer.Option(
        help="Rebuild even if a demo checkpoint is already there (one of another size or seed, or built by an "
             "older recipe, is refused without it); anything else at --out but an empty folder is never replaced.")
    ] = False,
) -> None:
    """Build the embedded demo SFT model: local BPE tokenizer, small Llama, short SFT."""
    from align.demo_model import build_demo_model, demo_model_dir

    target = out or demo_model_dir(size, seed)
    path = build_demo_model(target, size=size, seed=seed, force=force)
    typer.echo(f"demo model ({size}) ready at {path}")


def export(
    run: Annotated[Path, typer.Argument(help="A run directory from `align ppo`, `align dpo` or `align reward train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the exported model to.")],
    adapter: Annotated[
        bool, typer.Option("--adapter/--merge", help="Save only the PEFT adapter, or merge it into the base (default). A fully fine-tuned "
                                                 "reward model has no adapter: it is saved whole either way.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier export (or is empty); any other "
                                             "folder, and a checkpoint the export reads, is refused.")] = False,
) -> None:
    """Export an aligned policy (or a reward model) as an ordinary Hugging Face checkpoint."""
    from align.commands.export import export_run

    export_run(run, out, merge=not adapter, force=force, echo=typer.echo)


def _demo_epilog() -> str:
    from align.commands.demo import DemoConfig

    return (config_keys_help(DemoConfig) + "\n\nKeys prefixed [bold]reward.[/bold], [bold]ppo.[/bold] or [bold]dpo.[/bold] override "
            "those stages' configs (listed by `align reward train --help`, `align ppo --help` and `align dpo --help`).")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory for the whole pipeline.")] = Path("runs/demo"),
    config: ConfigOpt = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Stop after generating candidates and serve the annotation app; on an "
                           "earlier demo's --out, serve its database again (it adds what it lacks, removes nothing).")
    ] = False,
    continue_: Annotated[
        bool, typer.Option("--continue", help="Pick up from the rankings in --out's annotation database (those people "
                           "made after --serve, or an earlier demo's): train, export and compare again.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Start over: first remove the earlier demo in --out (its report, export, summary, "
                           "stage runs and annotation database with its rankings, those people made included). "
                           "Without --force, --continue or --serve an --out holding an earlier demo is refused.")
    ] = False,
    overrides: OverridesArg = None,
) -> None:
    """Run the whole pipeline on the embedded demo model, end to end."""
    from align.commands.demo import run_demo

    run_demo(out, config_path=config, overrides=overrides or [], serve=serve, resume_from_db=continue_, force=force)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    _end_with_launcher()
    configure_logging()
    # Deprecation notices from libraries are for align's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _register_stages()
    started = time.time()
    args = sys.argv[1:] if argv is None else argv
    try:
        with _said_on_sigterm(args, started):
            # Standalone mode: typer reports usage errors itself (exit 2) and handles Ctrl-C.
            app(args=argv, prog_name="align")
    except UserError as exc:
        if _first_to_say(str(exc)):
            typer.echo(f"error: {exc}", err=True)
        exit_process(exc.exit_code)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # the disk, not the run: what was saved before stays whole (align.run.atomic_directory)
        where = f" writing {exc.filename}" if exc.filename else ""
        if _first_to_say(f"{exc.strerror}{where}"):
            typer.echo(f"error: {exc.strerror}{where}{_continue_hint(args, started)}", err=True)
        exit_process(1)
    except SystemExit as exc:
        if exc.code == 130:  # typer's exit for Ctrl-C, which it leaves silent
            typer.echo(f"interrupted{_continue_hint(args, started)}", err=True)
        exit_process(exc.code)
    exit_process(0)


def _end_with_launcher() -> None:
    """A launch's process ends when its launcher does, however that ends. torch's launcher starts each
    rank in a session of its own, so a SIGKILL of the launcher, or of the process group it was started
    in, left the ranks training on: holding their GPUs and the run's folder, whose --resume was refused
    as in use, and finishing the run. On Linux the kernel kills a rank whose parent exits
    (PR_SET_PDEATHSIG); elsewhere nothing changes."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()  # (process 1 itself in a container that runs the launch as its command)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher ended before the request was made: another process adopted this one
        os.kill(os.getpid(), signal.SIGKILL)


def configure_logging() -> None:
    """Progress lines from the first process of a launch only: the others, which run the same steps,
    log warnings and errors alone, marked with their rank (as transformers' Trainer does with its
    `log_level_replica`), so that a two-process run does not say everything twice."""
    rank = os.environ.get("RANK", "0") if "LOCAL_RANK" in os.environ else "0"  # a launch sets both
    if rank in ("", "0"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(message)s")


def _first_to_say(message: str) -> bool:
    """Whether this process says a user error, or another process of the same launch on this machine
    has said the same words. Under `accelerate launch` every process meets a config's mistake: one
    line per machine is enough, and it must not be left to one chosen process, which the launcher
    may stop (SIGTERM) as soon as another has exited. So the first process to claim the words says
    them, at once: its claim is an empty file named after the launcher (its pid and start time, from
    /proc, so no later launch matches it) and the words; the others, finding it, exit without a word.
    The claims of launchers that have ended go as a new one is made.
    Outside a launch, without /proc (not Linux) or where the file cannot be made: it says them."""
    if "LOCAL_RANK" not in os.environ:
        return True
    import hashlib
    import tempfile

    try:
        started = _process_start(os.getppid())
        if started is None:  # no /proc
            return True
        launcher = f"{os.getppid()}-{started}"
        said = Path(tempfile.gettempdir()) / "align-said"
        said.mkdir(exist_ok=True)
        for claim in said.iterdir():
            pid = claim.name.partition("-")[0]
            if not (pid.isdigit() and claim.name.startswith(f"{pid}-{_process_start(int(pid))}-")):
                claim.unlink(missing_ok=True)  # its launcher has ended (or the pid is another process's now)
        key = hashlib.sha256(f"{launcher}\0{message}".encode()).hexdigest()[:40]
        os.close(os.open(said / f"{launcher}-{key}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except (OSError, IndexError):
        return True
    return True


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat's 22nd field); None once it has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _said_on_sigterm(args: list[str], started: float) -> Iterator[None]:
    """A training stage or the demo stopped by SIGTERM (a scheduler's preemption, `kill`) says so, with how
    it carries on (`_continue_hint`), then dies of the signal as it would have: no cleanup runs that the
    default action would skip, and the exit status is still the signal's. Not in a launch's ranks (the
    launcher stops the others when one fails, and says why), nor where a server answers SIGTERM itself."""
    import signal
    import threading

    stage = _stage_command(args) is not None or _command_words(args)[:1] == ["demo"]
    if (not stage or "--serve" in args or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
            or threading.current_thread() is not threading.main_thread()):  # (where signal handlers can be set)
        yield
        return

    def say_and_die(signum: int, frame: object) -> None:
        sys.stderr.write(f"terminated{_continue_hint(args, started)}\n")
        sys.stderr.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, say_and_die)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command_words(args: list[str]) -> list[str]:
    """The command's first two words (`reward train`), its options left out."""
    return [a for a in args if not a.startswith("-")][:2]


def _stage_command(args: list[str]) -> str | None:
    """`align ppo`, `align dpo` or `align reward train` where `args` run that training stage, else None."""
    words = _command_words(args)
    if words[:1] in (["ppo"], ["dpo"]):
        return f"align {words[0]}"
    return "align reward train" if words == ["reward", "train"] else None


def _continue_hint(args: list[str], started: float) -> str:
    """How an interrupted command carries on, for the training stages and the demo (`started`: when
    the command began; a run folder whose config.yaml is older holds an earlier run's checkpoints)."""
    command = _stage_command(args)
    if command is not None:
        # the run's folder where the command line names it (--resume RUN, --resume=RUN, output_dir=RUN)
        named = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--resume"]
        named += [a.split("=", 1)[1] for a in args if a.startswith(("--resume=", "output_dir="))]
        if not named:
            return f" (a run continues from its latest checkpoint: {command} --resume RUN, RUN its output_dir)"
        run = Path(named[-1]).expanduser()
        resumed = any(a == "--resume" or a.startswith("--resume=") for a in args)
        config = run / "config.yaml"
        if not config.is_file() or (not resumed and config.stat().st_mtime < started):  # an earlier run's folder
            return " (it stopped before it began writing its run folder: run the command again)"
        checkpoints = run / "checkpoints"
        if checkpoints.is_dir() and any(not c.name.startswith(".") for c in checkpoints.iterdir()):
            return f" (the run continues from its latest checkpoint: {command} --resume {shlex.quote(named[-1])})"
        return " (it stopped before its first checkpoint: run the command again, with overwrite=true)"
    if _command_words(args)[:1] == ["demo"]:
        if "--serve" in args:
            return " (align demo --serve serves it again, adding what it lacks)"
        return " (align demo --continue trains again from the rankings; --force starts over)"
    return ""


def exit_process(code: int | str | None) -> NoReturn:
    """Exit with `code`, read as `sys.exit` reads it.

    A rank of a multi-process run (`accelerate launch`: WORLD_SIZE > 1) leaves without the
    interpreter's finalization. DDP and FSDP2 modules keep the process group alive past
    `destroy_process_group`; torn down with the interpreter, its gloo threads can abort the
    process (SIGABRT, "terminate called without an active exception") after a run that
    succeeded, and the launcher then reports it failed (pytorch/pytorch#179291; about one run in
    thirty of two FSDP2 ranks on a busy 2-core machine). Everything a run writes is closed by
    then; standard streams and logging are flushed here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
