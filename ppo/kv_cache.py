"""The rollout's KV cache: buffers allocated once, written where the sampler says (gpt-fast's KVCache).

transformers' own StaticCache keeps a private write counter: on transformers 5 each layer writes at
its own running count and never reads a position it is given, so only the number of forwards run
keeps the writes in line with the mask and the position ids (a warm-up step run twice shifted every
later write). This cache has no counter. The sampler sets `write_position` (a device scalar) before
every forward; each layer writes its new keys and values at `write_position + 0..T-1` with
`index_copy_` and returns the whole buffers, as gpt-fast's `KVCache.update(input_pos, k, v)` does
(https://github.com/pytorch-labs/gpt-fast, model.py). Running a step again rewrites the same slots
with the same values, and a CUDA graph that reads `write_position` replays correctly at any step.

It plugs into a transformers model through the public cache API only (`transformers.Cache` holding
`CacheLayerMixin` layers, https://huggingface.co/docs/transformers/en/cache_explanation), and relies
on what the models' attention and mask code call on it, as transformers 5.17 to 5.25 do (tested in
tests/ppo/test_kv_cache.py; pyproject pins that range):

* `update(key_states, value_states, layer_idx, ...)` once per attention layer and forward, with the
  new (B, H_kv, T, D) keys and values; the returned tensors are the keys and values attended over.
  Any extra arguments are ignored: some families pass none (GPT-NeoX), none passes a cache position.
* `get_query_offset` -> `get_seq_length`: the cache slot of the first query token, where the causal
  mask starts (masking_utils `_preprocess_mask_arguments`); here the write position.
* `get_mask_sizes`: the key/value length and offset the 2D attention mask is padded to: the buffer.
* `is_compileable`: true, so that the mask code builds the decoding step's mask on the device rather
  than asking the host whether the padding mask is all ones (a sync a CUDA graph cannot capture).

This module imports transformers at its top: it is imported only where a rollout samples.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, (B, H_kv, length, D) each, written at explicit slots.

    The buffers take their shape, dtype and device from the first keys written (the prompt's), so the
    cache needs nothing from the model's config but its number of layers (head counts and sizes differ
    between families), and they stay at the same addresses from then on."""

    is_compileable = True  # see the module docstring: the decoding step's mask is built on the device
    is_sliding = False  # every slot is kept; a sliding-window model's mask still applies its window

    def __init__(self, length: int, write_position: torch.Tensor):
        super().__init__()
        self.length = length
        self.write_position = write_position  # shared with the other layers (RolloutKVCache)
        self.offsets = torch.arange(length, device=write_position.device)  # 0..length-1, sliced per write

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.length, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.length, value_states.shape[-1])
        self.is_initialized = True

    def write_slots(self, count: int) -> torch.Tensor:
        """(count,) the slots the next `count` tokens go to: write_position onwards, on the device."""
        return self.offsets[:count] + self.write_position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.write_slots(key_states.shape[-2])
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        """(key/value length, offset): the whole buffer from slot 0. (The first argument is the query
        length on transformers 5; it does not matter here.)"""
        return self.length, 0

    def get_seq_length(self) -> torch.Tensor:
        """The slot of the next token written: where the queries of a forward sit in the buffer."""
        return self.write_position

    def get_max_length(self) -> int:
        return self.length

    def reset(self) -> None:
        """Zero the buffers (a rollout then reads nothing of the previous one, not even in masked
        slots: a masked slot's weight is 0, but 0 times a non-finite value would not be)."""
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class RolloutKVCache(Cache):
    """Keys and values of `num_layers` attention layers for `length` slots, written at `write_position`.

    Set `write_position` (in place: a captured step reads its address) to the slot of the first token of
    the next forward: 0 for a prompt, then the slot of each fed-back token."""

    def __init__(self, num_layers: int, length: int, device: torch.device | str):
        self.write_position = torch.zeros((), dtype=torch.long, device=device)
        super().__init__(layers=[SlotLayer(length, self.write_position) for _ in range(num_layers)])
        self.length = length

    def seek(self, slot: int) -> None:
        """Write the next forward's first token at `slot`."""
        if not 0 <= slot < self.length:
            raise IndexError(f"slot {slot} is outside the cache's {self.length} slots")
        self.write_position.fill_(slot)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.write_position.zero_()
