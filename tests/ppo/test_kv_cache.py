"""The rollout's KV cache (ppo.kv_cache): writes land where the write position says, a repeated write
changes nothing, and the transformers behaviour it relies on (pinned in pyproject) holds: the models'
mask code reads the write position as the queries' slot and builds the decoding step's mask on the
device, and the model takes the cache under the name `cache_argument` gives."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from align.forward import cache_argument
from ppo.kv_cache import RolloutKVCache


def test_a_write_lands_at_the_write_position_and_a_repeat_rewrites_the_same_slots():
    cache = RolloutKVCache(num_layers=2, length=8, device="cpu")
    prompt = torch.randn(2, 3, 4, 5)  # (B, H_kv, T, D): a 4-token prompt
    cache.seek(0)
    keys, values = cache.update(prompt, -prompt, layer_idx=1)
    assert keys.shape == (2, 3, 8, 5) and torch.equal(keys[:, :, :4], prompt) and torch.equal(values[:, :, :4], -prompt)
    token = torch.randn(2, 3, 1, 5)
    cache.seek(6)
    for _ in range(2):  # as a warm-up beside a captured step would
        keys, _ = cache.update(token, token, layer_idx=1)
    assert torch.equal(keys[:, :, 6:7], token)
    assert not keys[:, :, 4:6].any() and not keys[:, :, 7:].any()  # nothing else was written
    assert cache.layers[0].keys is None  # layer 0 untouched: buffers are per layer, made at the first write
    with pytest.raises(IndexError):
        cache.seek(8)
    cache.reset()
    assert not keys.any() and int(cache.write_position) == 0


@pytest.fixture(scope="module")
def tiny_model(tiny_random_model):
    from align.modeling import load_causal_lm

    return load_causal_lm(tiny_random_model)


def test_the_mask_code_puts_the_queries_at_the_write_position_and_builds_the_step_mask_on_the_device(tiny_model):
    # masking_utils asks the cache for the queries' offset (get_query_offset -> get_seq_length) and the
    # keys' length (get_mask_sizes); with is_compileable it builds the mask of a one-token step instead of
    # asking the host whether the padding mask is all ones (a sync that a CUDA graph cannot capture).
    from transformers.masking_utils import create_causal_mask

    config = tiny_model.config
    assert config._attn_implementation == "sdpa"
    cache = RolloutKVCache(config.num_hidden_layers, length=8, device="cpu")
    cache.seek(5)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])  # slot 5 holds the new token
    embeds = torch.zeros(2, 1, config.hidden_size)
    mask = create_causal_mask(config, embeds, padding, cache, torch.tensor([[3], [5]]))
    expected = padding.bool() & (torch.arange(8) <= 5)  # causal: the keys up to the query's own slot
    assert mask is not None and mask.shape == (2, 1, 1, 8)
    assert torch.equal(mask[:, 0, 0], expected)
    cache.seek(3)  # the same padding, queries at slot 3: the causal part moves with the write position
    mask = create_causal_mask(config, embeds, padding, cache, torch.tensor([[1], [3]]))
    assert torch.equal(mask[:, 0, 0], padding.bool() & (torch.arange(8) <= 3))
    # no padding at all: a cache that is not `is_compileable` gets None here (sdpa's is_causal instead), decided
    # on the host from the mask's values; ours gets the mask, built without reading them
    mask = create_causal_mask(config, embeds, torch.ones_like(padding), cache, torch.tensor([[3], [3]]))
    assert mask is not None and torch.equal(mask[:, 0, 0], (torch.arange(8) <= 3).expand(2, 8))


def test_the_trunk_takes_the_cache_under_the_name_cache_argument_gives(tiny_random_model):
    # transformers 5.25 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40)
    from peft import LoraConfig, get_peft_model

    from align.modeling import load_causal_lm

    model = load_causal_lm(tiny_random_model)
    trunk = model.model
    name = cache_argument(trunk)
    assert name in inspect.signature(trunk.forward).parameters
    # a peft model's forward takes **kwargs only: the name is its base model's
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert "cache" not in inspect.signature(wrapped.forward).parameters
    assert cache_argument(wrapped) == name


def test_the_installed_transformers_is_in_the_range_pyproject_pins():
    # The cache relies on transformers' cache and mask code as these tests find it; a version outside the
    # range they ran on must be tested (and the range widened) before it is trusted.
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")  # tomli: the dev extra, 3.10
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    (pin,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "transformers"]
    assert pin.specifier.contains(transformers.__version__), (transformers.__version__, str(pin.specifier))
