"""Rollout sampling: exact categorical draws; prompts padded and cut on the left; the KV-cache
loop continues left-padded prompts as `generate` does; the sampler's tokens, log-probs and values
are those of the eager full forward (fp32 and bf16, trained adapter and value head, left padding,
rows that end early); its buffers are kept across rollouts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from align.config import load_config
from align.errors import TrainingDiverged, UserError
from ppo.config import PPOConfig
from ppo.sampling import sample_responses, sample_tokens
from ppo.trainer import PPOTrainer
from tests.ppo.decoding import TOLERANCE, discrepancy_on_prompts, left_padded_prompts, trained_trainer


def test_sample_tokens_draws_each_token_with_its_probability():
    # logits (0, -inf, ln 3) -> probs (1/4, 0, 3/4); at temperature 1 token 1 is never drawn
    logits = torch.tensor([0.0, float("-inf"), math.log(3)]).expand(20_000, 3)
    torch.manual_seed(0)
    tokens, logp = sample_tokens(logits, temperature=1.0)
    counts = torch.bincount(tokens, minlength=3)
    assert counts[1] == 0
    assert abs(counts[0].item() / 20_000 - 0.25) < 0.015  # binomial std 0.003
    torch.testing.assert_close(logp, torch.where(tokens == 0, math.log(0.25), math.log(0.75)))
    # temperature 2: logits / 2 -> exp = (1, 0, sqrt 3) -> p0 = 1 / (1 + sqrt 3) = 0.366
    tokens, _ = sample_tokens(logits, temperature=2.0)
    assert abs(torch.bincount(tokens, minlength=3)[0].item() / 20_000 - 1 / (1 + math.sqrt(3))) < 0.015


def test_prompts_are_padded_and_cut_on_the_left_and_the_tokenizer_is_left_as_it_was(tiny_random_model):
    from align.chat import render_prompt
    from align.modeling import load_tokenizer
    from ppo.experience import encode_prompts

    tok = load_tokenizer(tiny_random_model)
    tok.padding_side = tok.truncation_side = "right"
    prompts = ["Hi.", "Tell me about rivers. " * 20]
    whole = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert len(whole[0]) < 16 < len(whole[1])  # one short prompt, one over the limit
    ids, mask = encode_prompts(tok, prompts, max_length=16, device="cpu")
    assert ids.shape == mask.shape == (2, 16)
    short = len(whole[0])
    assert mask[0].tolist() == [0] * (16 - short) + [1] * short and ids[0, -short:].tolist() == whole[0]
    # the end kept (the response follows it), and the bos the template begins with
    assert whole[1][0] == tok.bos_token_id and mask[1].all() and ids[1].tolist() == [whole[1][0], *whole[1][-15:]]
    assert (tok.padding_side, tok.truncation_side) == ("right", "right")


def test_sampler_continues_left_padded_prompts_like_generate(demo_model, tmp_path):
    trainer = PPOTrainer(load_config(PPOConfig, None, [f"policy_model={demo_model}", f"output_dir={tmp_path}",
                                                         "reward_model=unused"]),
                         reward_model=object())
    trainer.setup()  # a fresh adapter (B = 0): the policy is the SFT model
    tok = trainer.tokenizer
    from align.chat import render_prompt
    from align.synthetic import make_prompts

    enc = tok([render_prompt(tok, p) for p in make_prompts(3, seed=1)], return_tensors="pt", padding=True,
              add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    # near-zero temperature is greedy decoding: the same tokens as generate(do_sample=False)
    ours, _, _ = sample_responses(trainer.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24,
                                  temperature=1e-4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        reference = trainer.model.policy.generate(**enc, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                                  pad_token_id=tok.pad_token_id, eos_token_id=None)
    reference = reference[:, enc["input_ids"].shape[1]:]
    after_eos = ((reference == tok.eos_token_id).cumsum(-1) > 0) & (reference != tok.eos_token_id)
    assert torch.equal(ours[~after_eos], reference[~after_eos])
    assert (ours[after_eos] == tok.pad_token_id).all()


def test_sampler_logprobs_and_values_match_a_full_forward(small_run):
    trainer = PPOTrainer(load_config(PPOConfig, None, small_run + ["batch_size=16", "response_length=12"]))
    trainer.setup()
    with torch.no_grad():  # a trained-looking adapter and value head, so both matter
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name or name.startswith("value_head."):
                p.normal_(std=0.05)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    samples = trainer.generate(trainer.sampler.next_batch())
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad), \
        "sampling with the merged adapter left the base weights changed"
    logprobs, values = trainer.policy_logprobs_and_values(samples)
    mask = samples.response_mask.bool()
    torch.testing.assert_close(samples.logprobs[mask], logprobs[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(samples.values[mask], values[mask], atol=1e-5, rtol=0)
    ref_logprobs = trainer.reference_logprobs(samples)
    assert not torch.allclose(logprobs[mask], ref_logprobs[mask], atol=1e-3)  # the adapter is in play


def test_bf16_rollouts_keep_the_adapter_apart_and_recompute_old_logprobs(small_run):
    # Merged into bf16 weights a small LoRA update rounds away, and cached bf16 decoding differs
    # from the training forward: so in bf16 pi_old and V_old come from the training forward.
    trainer = PPOTrainer(load_config(PPOConfig, None, small_run + ["dtype=bfloat16"]))
    trainer.setup()
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    exp, _ = trainer.rollout(trainer.sampler.next_batch())
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
    logprobs, values = trainer.policy_logprobs_and_values(exp)
    mask = exp.response_mask.bool()
    assert torch.equal(exp.logprobs[mask], logprobs[mask])  # the first PPO ratio is exactly 1
    assert torch.equal(exp.values[mask], values[mask])


class _Decoder:
    """A decoder whose logits favour eos more at each step; NaN logits from `nan_at` on."""

    config = SimpleNamespace(num_hidden_layers=0)  # a cache with no layers: this decoder keeps no keys

    def __init__(self, vocab: int = 5, eos: int = 4, nan_at: int | None = None):
        self.vocab, self.eos, self.nan_at, self.steps = vocab, eos, nan_at, 0

    def decode_step(self, input_ids, attention_mask, position_ids, cache):
        logits = torch.zeros(input_ids.shape[0], self.vocab)
        logits[:, self.eos] = self.steps * 0.7
        if self.nan_at is not None and self.steps >= self.nan_at:
            logits[:, :] = float("nan")
        self.steps += 1
        return logits, None


def _sample(decoder, sync_every):
    ids = torch.tensor([[1, 2, 3], [0, 2, 1], [3, 3, 3]])
    torch.manual_seed(0)
    return sample_responses(decoder, ids, torch.ones_like(ids), max_new_tokens=24, temperature=1.0,
                            eos_token_id=4, pad_token_id=0, sync_every=sync_every)


def test_checking_for_the_end_every_8_steps_samples_the_same_responses():
    # On a GPU the loop asks the device whether every row has ended only every 8 steps; the rows
    # that ended in between get pad, so the responses and log-probs are those of checking every step.
    every_step = _sample(_Decoder(), 1)
    every_8 = _sample(_Decoder(), 8)
    assert (every_step[0] == 4).any(-1).all()  # every row ended before 24 tokens
    torch.testing.assert_close(every_8[0], every_step[0], rtol=0, atol=0)
    torch.testing.assert_close(every_8[1], every_step[1], rtol=0, atol=0)


class _RecordingDecoder(_Decoder):
    """Records, at every decoding step after the prompt's, the inputs' addresses and values."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def decode_step(self, input_ids, attention_mask, position_ids, cache):
        if self.steps > 0:
            self.seen.append(([t.data_ptr() for t in (input_ids, attention_mask, position_ids, cache.write_position)],
                              input_ids[:, 0].tolist(), attention_mask.sum(-1).tolist(), position_ids[:, 0].tolist(),
                              cache.write_position.item()))
        return super().decode_step(input_ids, attention_mask, position_ids, cache)


def test_the_decoding_step_reads_the_same_buffers_at_every_step():
    # A CUDA graph replays fixed addresses: the loop must update its inputs in place, and they
    # must still say what each step needs (the token just sampled, the next position and slot).
    decoder = _RecordingDecoder()
    response, _, _ = _sample(decoder, 8)
    assert len(decoder.seen) >= 3
    addresses = {tuple(seen[0]) for seen in decoder.seen}
    assert len(addresses) == 1
    for step, (_, fed, attended, positions, slot) in enumerate(decoder.seen):
        assert fed == response[:, step].tolist()  # the token sampled at the step before (pad once ended)
        assert attended == [3 + step + 1] * 3  # the prompt and every token fed so far
        assert positions == [3 + step] * 3 and slot == 3 + step


def test_non_finite_logits_raise_at_the_next_check():
    for sync_every in (1, 8):
        with pytest.raises(TrainingDiverged, match="non-finite logits while sampling"):
            _sample(_Decoder(nan_at=3), sync_every)


def test_bf16_rollouts_sampled_with_the_merged_adapter_keep_ratio_one_and_the_base(small_run):
    # sample_merged in bf16: the samples come from the merged (rounded) weights, pi_old and V_old
    # still from the training forward, and the base comes back bit for bit.
    trainer = PPOTrainer(load_config(PPOConfig, None, small_run + ["dtype=bfloat16", "sample_merged=true"]))
    trainer.setup()
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-2)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    merged = []
    adapter_merged = trainer.model.adapter_merged
    trainer.model.adapter_merged = lambda: merged.append(1) or adapter_merged()
    exp, _ = trainer.rollout(trainer.sampler.next_batch())
    assert merged == [1]
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
    logprobs, values = trainer.policy_logprobs_and_values(exp)
    mask = exp.response_mask.bool()
    assert torch.equal(exp.logprobs[mask], logprobs[mask])  # the first PPO ratio is exactly 1
    assert torch.equal(exp.values[mask], values[mask])


def _fake_cuda_graphs(monkeypatch, events, fail_capture=False):
    """torch.cuda's graph API as a log: a capture runs the step's Python without executing it
    (marked "captured"), a replay executes the captured step once."""
    import contextlib

    state = {"capturing": False}

    class FakeGraph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def graph(_graph):
        state["capturing"] = True
        try:
            yield
            if fail_capture:  # as capture_end reports an op that synchronised during the capture
                raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            state["capturing"] = False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return state


class _LoggingDecoder:
    def __init__(self, events, state):
        self.events, self.state = events, state

    def decode_step(self, *inputs):
        self.events.append("captured" if self.state["capturing"] else "eager")
        return torch.zeros(2, 5), None


def test_the_graphed_decoding_step_is_captured_once_and_replayed_at_every_later_call(monkeypatch):
    # The first step runs eagerly (the warm-up), the second is captured (which executes nothing) and
    # replayed, and every later step, in this rollout or the next, is one replay of the same buffers.
    from ppo.sampling import CUDAGraphStep

    events = []
    step = CUDAGraphStep(_LoggingDecoder(events, _fake_cuda_graphs(monkeypatch, events)))
    inputs = (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 1), object())
    for _ in range(6):
        step(*inputs)
    assert events == ["eager", "captured", "replay", "replay", "replay", "replay", "replay"]
    with pytest.raises(ValueError, match="same tensors"):  # a replay reads the captured addresses only
        step(inputs[0].clone(), *inputs[1:])


def test_a_step_that_cannot_be_captured_stops_the_run_naming_the_setting_that_decodes_eagerly(monkeypatch):
    # a failed capture can leave torch.cuda.graph's side stream current: no eager fallback in that state
    from ppo.sampling import CUDAGraphStep

    events = []
    step = CUDAGraphStep(_LoggingDecoder(events, _fake_cuda_graphs(monkeypatch, events, fail_capture=True)))
    inputs = (torch.zeros(2, 1, dtype=torch.long),)
    step(*inputs)
    with pytest.raises(UserError, match=r"could not be captured as a CUDA graph \(operation not permitted "
                                           r"when stream is capturing\); set cuda_graphs=false .* --resume RUN cuda_graphs=false"):
        step(*inputs)
    assert events == ["eager", "captured"] and step.graph is None  # nothing ran eagerly after the failure


# --- the cached decoding step against the eager full forward (tests/ppo/decoding.py) ------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_decoding_samples_what_the_eager_full_forward_samples(tiny_random_model, tmp_path, dtype):
    # The production path: a trained adapter (not merged), the value head, left-padded prompts of
    # different lengths, one row ending at its third token while the others run on.
    found = discrepancy_on_prompts(trained_trainer(tiny_random_model, tmp_path, dtype))
    assert found.rows_ended_early >= 1 and found.rows_ran_on >= 1
    # bf16's rounding, which differs between CPU kernels, may flip a draw that lies near a boundary of the
    # cumulative distribution; the log-probs and values below are read on the cached step's own tokens
    assert found.same_tokens or dtype == "bfloat16", found
    assert found.logprobs <= TOLERANCE[dtype] and found.values <= TOLERANCE[dtype], found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_exactness_check_catches_an_off_by_one_write_position(tiny_random_model, tmp_path, dtype, monkeypatch):
    # The failure the cache of our own rules out (a write counter one step ahead of the mask): the
    # check above must see it at its tolerance.
    from ppo.kv_cache import RolloutKVCache

    seek = RolloutKVCache.seek
    monkeypatch.setattr(RolloutKVCache, "seek", lambda cache, slot: seek(cache, slot + 1))
    found = discrepancy_on_prompts(trained_trainer(tiny_random_model, tmp_path, dtype))
    assert not found.same_tokens
    assert found.logprobs > TOLERANCE[dtype] and found.values > TOLERANCE[dtype], found


class _TwiceDecoder:
    """Runs every decoding step twice, as a warm-up beside a captured step would."""

    def __init__(self, decoder):
        self.decoder, self.config = decoder, decoder.config

    def decode_step(self, *inputs):
        self.decoder.decode_step(*inputs)
        return self.decoder.decode_step(*inputs)


def test_running_a_decoding_step_twice_changes_nothing(tiny_random_model, tmp_path):
    # Positions are explicit: a repeated step rewrites the same cache slots with the same keys and values
    # (with transformers' StaticCache its counter moved on and every later write landed one slot late).
    trainer = trained_trainer(tiny_random_model, tmp_path, "float32")
    ids, mask = left_padded_prompts(trainer.tokenizer)
    runs = []
    for decoder in (trainer.model, _TwiceDecoder(trainer.model)):
        torch.manual_seed(0)
        runs.append(sample_responses(decoder, ids, mask, max_new_tokens=10, temperature=1.0, eos_token_id=-1,
                                     pad_token_id=0))
    for once, twice in zip(*runs):
        assert torch.equal(once, twice)


def test_the_pool_keeps_one_set_of_buffers_per_shape_and_weights_and_a_rollout_reads_nothing_of_the_last(
        tiny_random_model, tmp_path):
    from ppo.sampling import DecodeBufferPool

    trainer = trained_trainer(tiny_random_model, tmp_path, "float32")
    model, pad = trainer.model, trainer.tokenizer.pad_token_id
    ids, mask = left_padded_prompts(trainer.tokenizer)
    other_ids, other_mask = ids.flip(0)[:, 4:], mask.flip(0)[:, 4:]  # other rows, a shorter prompt, the same bucket

    def sample(pool, ids, mask, weights="policy"):
        torch.manual_seed(0)
        return sample_responses(model, ids, mask, max_new_tokens=10, temperature=1.0, eos_token_id=-1,
                                pad_token_id=pad, pool=pool, weights=weights)

    pool = DecodeBufferPool(capacity=2)
    sample(pool, ids, mask)
    (first,) = pool.sets.values()
    keys = first.cache.layers[0].keys.data_ptr()
    again = sample(pool, other_ids, other_mask)
    assert list(pool.sets.values()) == [first] and first.cache.layers[0].keys.data_ptr() == keys
    fresh = sample(DecodeBufferPool(), other_ids, other_mask)
    for reused, new in zip(again, fresh):
        assert torch.equal(reused, new)
    sample(pool, ids, mask, weights="sft")  # a graph replays the kernels it captured: a set per weights
    assert len(pool.sets) == 2 and first in pool.sets.values()
    sample(pool, ids[:2], mask[:2])  # a third shape: the least recently used set goes
    assert len(pool.sets) == 2 and first not in pool.sets.values()


@pytest.mark.parametrize("dtype,policy_weights", [("float32", "merged"), ("bfloat16", "adapter")])
def test_the_trainer_samples_the_policy_and_the_sft_model_with_buffers_of_their_own(tiny_random_model, tmp_path, dtype,
                                                                                     policy_weights):
    # A captured step replays the kernels of the call it captured (with or without the adapter's, merged or
    # not): the SFT model sampled for evaluation must not replay the policy's graph, nor the reverse.
    from align.synthetic import make_prompts

    trainer = trained_trainer(tiny_random_model, tmp_path, dtype, "response_length=4")
    prompts = make_prompts(4, seed=2)
    trainer.generate(prompts)
    trainer.generate(prompts, adapter=False)
    trainer.generate(prompts)
    assert sorted(key[1] for key in trainer.decode_pool.sets) == sorted([policy_weights, "sft"])
