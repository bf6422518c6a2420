"""Shared fixtures: locally built models (no downloads), isolated caches, the shared data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Offline and quiet before any test module imports huggingface_hub or tokenizers, which read these as they load
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout (CI has it), or $ALIGN_SHARED_DATA."""
    return Path(os.environ.get("ALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real preference data not found at {path} (set ALIGN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with the demo tokenizer, built in seconds."""
    from align.demo_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-random") / "model", seed=0)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real tiny demo SFT model, built once (about 2 minutes) and cached in ALIGN_CACHE_DIR."""
    from align.demo_model import ensure_demo_model

    return ensure_demo_model("tiny")


@pytest.fixture(autouse=True)
def _pytest_outlives_its_parent(monkeypatch):
    """A test that calls align's `main` in this process as a launch's rank (LOCAL_RANK set) must not
    have the kernel kill pytest when pytest's parent exits (align.commands.cli._end_with_launcher)."""
    monkeypatch.setattr("align.commands.cli._end_with_launcher", lambda: None)


@pytest.fixture
def umask():
    """Set the process umask for one test (returns a setter; the old umask comes back after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """The permission bits of `root` ('.') and of everything below it, by relative path."""
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *sorted(root.rglob("*"))]}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A stage given num_threads sets torch's thread count for the whole process: each test starts with
    the count the suite started with, whichever tests ran before it."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    if threads is not None:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_reward_model(tiny_random_model, tmp_path_factory) -> Path:
    """A reward-model directory in the `align reward train` layout (untrained score head):
    enough to exercise the real loading and scoring path."""
    from align.modeling import load_tokenizer
    from reward.model import build_reward_model, save_reward_model

    tokenizer = load_tokenizer(tiny_random_model)
    model = build_reward_model(tiny_random_model, tokenizer, seed=1)
    out = tmp_path_factory.mktemp("reward") / "model"
    return save_reward_model(model, tokenizer, out, gain=10.0, bias=0.0, info={"note": "random head, for tests"})


@pytest.fixture(scope="session")
def tiny_ppo_run(tiny_random_model, random_reward_model, tmp_path_factory) -> Path:
    """A finished two-iteration PPO run on the random model (seconds): RUN/policy, summary, ..."""
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import run_ppo

    root = tmp_path_factory.mktemp("ppo-run")
    cfg = load_config(PPOConfig, None, [
        f"policy_model={tiny_random_model}", f"reward_model={random_reward_model}", f"output_dir={root / 'run'}",
        "num_prompts=32", "num_eval_prompts=4", "num_iterations=2", "batch_size=8", "num_mini_batches=2",
        "num_ppo_epochs=1", "response_length=8", "learning_rate=5e-2", "save_every=0", "progress=false", "seed=1",
    ])
    run_ppo(cfg)
    return root / "run"
