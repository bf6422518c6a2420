"""The optimisation phase's memory reuse (ppo.optimise)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A child process frees 128 MiB of 1 MiB blocks and allocates them again, 10 times; it prints the
# page faults of rounds 2-10 (the first round faults its pages in either way).
CHURN = """
import json, resource, sys, torch
from ppo.optimise import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(2**18) for _ in range(128)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": sum(faults[1:])}))
"""


def churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_are_reused_without_faulting_their_pages_in_again():
    default, kept = churn("default"), churn("keep")
    assert kept["kept"] is True
    # by default part of it goes back to the kernel each round: over 10 page faults per block
    assert default["faults"] > 9 * 128 * 10, default
    assert kept["faults"] < default["faults"] / 10, (kept, default)
