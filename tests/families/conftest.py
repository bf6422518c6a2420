"""One tiny random-init checkpoint per family, built once per session (seconds each)."""

from __future__ import annotations

import pytest
import torch

from tests.families.builders import build_family_model, build_tiny_bert

# GPT-2 is built as its hub checkpoint ships: no pad token, no chat template.
PADLESS = {"gpt2"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            out = tmp_path_factory.mktemp(family) / "model"
            built[family] = build_family_model(family, out, pad=family not in PADLESS,
                                               chat_template=family not in PADLESS)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "model")
