"""PPO math on 3-element tensors; every expected value is worked out in the comment beside it."""

from __future__ import annotations

import math

import pytest
import torch

from ppo import core


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def test_logprobs_from_logits_uses_the_sampling_temperature():
    # logits (0, 0, ln 2) -> probs (1/4, 1/4, 1/2); tokens 0, 1, 2 at three positions
    logits = torch.tensor([0.0, 0.0, math.log(2)]).expand(1, 3, 3)
    tokens = torch.tensor([[0, 1, 2]])
    close(core.logprobs_from_logits(logits, tokens), [[math.log(0.25), math.log(0.25), math.log(0.5)]])
    # temperature 2: logits / 2 = (0, 0, ln 2 / 2) -> exp = (1, 1, sqrt 2) -> p(2) = sqrt2 / (2 + sqrt2)
    p2 = math.sqrt(2) / (2 + math.sqrt(2))
    p0 = 1 / (2 + math.sqrt(2))
    close(core.logprobs_from_logits(logits, tokens, temperature=2.0), [[math.log(p0), math.log(p0), math.log(p2)]])


@pytest.mark.parametrize("chunk_tokens", [0, 1, 2])
def test_logprobs_and_entropy_from_hidden(chunk_tokens):
    # The head is the identity, so the hidden states are the logits.
    # entropies: uniform over 3 -> ln 3; (1/4, 1/4, 1/2) -> -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 1.5 ln 2
    # log-probs of tokens (0, 2, 1) = (ln 1/3, ln 1/2, ln 1/3); in chunks of 1 or 2 positions alike
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)], [5.0, 5.0, 5.0]]])
    logp, entropy = core.logprobs_from_hidden(logits, lambda h: h, torch.tensor([[0, 2, 1]]),
                                              chunk_tokens=chunk_tokens, with_entropy=True)
    close(logp, [[math.log(1 / 3), math.log(0.5), math.log(1 / 3)]])
    close(entropy, [[math.log(3), 1.5 * math.log(2), math.log(3)]])
    assert core.logprobs_from_hidden(logits, lambda h: h, torch.tensor([[0, 2, 1]]))[1] is None


@pytest.mark.parametrize("chunk_tokens", [1, 4, 5])
def test_chunked_logprobs_match_the_whole_logits_in_value_and_gradient(chunk_tokens):
    # (B=2, T=3) positions, H=4, V=7 through a linear head, at temperature 0.7; chunks of 1, 4 (a
    # ragged last chunk) and 5 positions must give the plain computation's values and gradients
    # for the hidden states and the head's weight.
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(4, 7, bias=False).double()
    tokens = torch.tensor([[0, 6, 3], [2, 2, 5]])

    def loss_and_grads(fn):
        head.zero_grad()
        hidden.grad = None
        logp, entropy = fn()
        (logp * torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]], dtype=torch.float64) + 0.3 * entropy).sum().backward()
        return logp.detach(), entropy.detach(), hidden.grad.clone(), head.weight.grad.clone()

    def plain():
        logp = torch.log_softmax(head(hidden) / 0.7, -1)
        return logp.gather(-1, tokens[..., None])[..., 0], -(logp.exp() * logp).sum(-1)

    expected = loss_and_grads(plain)
    actual = loss_and_grads(lambda: core.logprobs_from_hidden(hidden, head, tokens, 0.7, chunk_tokens, True))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_kl_penalty_k1_and_k3():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    # k1 = logp - ref = (0.5, -1, 0)
    close(core.kl_penalty(logp, ref, "k1"), [[0.5, -1.0, 0.0]])
    # k3 = (e^{-k1} - 1) + k1: (e^-0.5 - 0.5, e - 2, 0) = (0.106531, 0.718282, 0)
    close(core.kl_penalty(logp, ref, "k3"), [[math.exp(-0.5) - 0.5, math.e - 2, 0.0]])
    assert (core.kl_penalty(logp, ref, "k3") >= 0).all()


def test_k3_is_bounded_as_verl_bounds_it_and_unchanged_within_the_bound():
    # at sampling temperature 0.05 GRPO's k3 loss was 1.4e7 and its gradient norm 3e8
    # log pi - log pi_ref = (-2, -1000, 30):
    #   -2:    k3 = e^2 - 1 - 2 = 4.389056 < 10, unchanged; d/dlogp = 1 - e^{-x} = 1 - e^2 = -6.389056
    #   -1000: k3 = e^1000 - 1001 = inf unbounded (and a NaN gradient); bounded: 10, gradient 0
    #   30:    k3 = e^-30 - 1 + 30 = 29.0 unbounded; bounded: 10, gradient 0
    logp = torch.tensor([[-3.0, -1000.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, 0.0, -30.5]])
    kl = core.kl_penalty(logp, ref, "k3")
    close(kl, [[math.e ** 2 - 3, 10.0, 10.0]])
    assert core.K3_BOUND == 10.0
    kl.mean().backward()
    close(logp.grad, [[(1 - math.e ** 2) / 3, 0.0, 0.0]])
    # k1 is linear in the log-ratio: no bound
    close(core.kl_penalty(logp.detach(), ref, "k1"), [[-2.0, -1000.0, 30.0]])
    # measured (the evaluation's KL), k3 is not bounded: the bound would read it low
    measured = core.kl_penalty(logp.detach(), ref, "k3", bounded=False)
    close(measured[:, [0, 2]], [[math.e ** 2 - 3, math.exp(-30) + 29]])
    assert measured[0, 1] == math.inf


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_is_zero_and_finite_on_padding_gradient_included(estimator):
    # the third token is padding: log pi = -100 there (a pad token the policy never emits), the
    # reference's log-prob was zeroed; unmasked, k3 = e^100 - 101 = inf and inf * 0 = NaN
    logp = torch.tensor([[-1.0, -2.0, -100.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    kl = core.kl_penalty(logp, ref, estimator, mask)
    expected = [[0.5, -1.0, 0.0]] if estimator == "k1" else [[math.exp(-0.5) - 0.5, math.e - 2, 0.0]]
    close(kl, expected)
    core.masked_mean(kl, mask).backward()
    # d/dlogp of the mean over 2 tokens: k1 -> 1/2; k3 = e^{-x} - 1 + x -> (1 - e^{-x}) / 2; padding 0
    want = [0.5, 0.5, 0.0] if estimator == "k1" else [(1 - math.exp(-0.5)) / 2, (1 - math.e) / 2, 0.0]
    close(logp.grad, [want])


def test_compute_rewards_puts_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.5, -1.0, 0.7]])
    mask = torch.tensor([[1, 1, 0]])
    # -beta * kl with beta 0.1 = (-0.05, 0.1, masked 0); score 2 lands on index 1 (the last real token)
    rewards, non_score = core.compute_rewards(kl, torch.tensor([2.0]), 0.1, mask)
    close(non_score, [[-0.05, 0.1, 0.0]])
    close(rewards, [[-0.05, 2.1, 0.0]])
    assert core.last_token_index(torch.tensor([[1, 1, 1], [1, 0, 0]])).tolist() == [2, 0]


def test_gae_full_and_masked():
    # gamma 1, lambda 0.5, V = 0.5 everywhere, reward 1 at the end:
    # t=2: delta = 1 + 0 - 0.5 = 0.5 -> A2 = 0.5
    # t=1: delta = 0 + 0.5 - 0.5 = 0 -> A1 = 0 + 0.5 * 0.5 = 0.25
    # t=0: delta = 0 -> A0 = 0.125; returns = A + V = (0.625, 0.75, 1.0)
    adv, ret = core.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 0.5)
    close(adv, [[0.125, 0.25, 0.5]])
    close(ret, [[0.625, 0.75, 1.0]])
    # mask (1, 1, 0): the episode ends at t=1, whatever sits at t=2 is ignored
    # t=1: delta = 1 + 0 - 0.5 = 0.5 -> A1 = 0.5; t=0: delta = 0 + 0.5 - 0.5 = 0 -> A0 = 0.25
    adv, ret = core.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.full((1, 3), 0.5), torch.tensor([[1, 1, 0]]), 1.0, 0.5)
    close(adv, [[0.25, 0.5, 0.0]])
    close(ret, [[0.75, 1.0, 0.0]])
    # gamma 0.5, lambda 1, V = 0: A_t = discounted return: (0.25, 0.5, 1)
    adv, _ = core.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), 0.5, 1.0)
    close(adv, [[0.25, 0.5, 1.0]])


def test_gather_logprobs_takes_each_positions_token():
    logp = torch.tensor([[[-0.1, -2.0, -3.0], [-1.0, -0.5, -2.5], [-4.0, -0.2, -1.5]]])  # (1, 3 positions, V=3)
    torch.testing.assert_close(core.gather_logprobs(logp, torch.tensor([[0, 2, 1]])), torch.tensor([[-0.1, -2.5, -0.2]]))


def test_masked_mean_and_unbiased_var_ignore_masked_entries():
    x, mask = torch.tensor([1.0, 2.0, 6.0, 100.0]), torch.tensor([1, 1, 1, 0])
    # the masked entries 1, 2, 6: mean 3, squared deviations 4 + 1 + 9 = 14 over n - 1 = 2
    torch.testing.assert_close(core.masked_mean(x, mask), torch.tensor(3.0))
    torch.testing.assert_close(core.masked_var(x, mask), torch.tensor(7.0))
    rows = torch.tensor([[1.0, 3.0, 50.0], [4.0, 0.0, 0.0]])
    torch.testing.assert_close(core.masked_mean(rows, torch.tensor([[1, 1, 0], [1, 0, 0]]), dim=1), torch.tensor([2.0, 4.0]))


def test_an_inf_or_nan_at_a_masked_entry_does_not_reach_masked_statistics():
    # a padding token's log-prob can be -inf; -inf * 0 would be NaN
    x, mask = torch.tensor([1.0, 2.0, 6.0, -math.inf]), torch.tensor([1, 1, 1, 0])
    torch.testing.assert_close(core.zero_masked(x, mask), torch.tensor([1.0, 2.0, 6.0, 0.0]))
    torch.testing.assert_close(core.masked_mean(x, mask), torch.tensor(3.0))
    torch.testing.assert_close(core.masked_var(x, mask), torch.tensor(7.0))
    # whitened (1, 2, 6): mean 3, std sqrt(7); the padding entry comes back 0
    close(core.masked_whiten(x, mask), [-2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7), 0.0], tol=1e-4)
    close(core.masked_whiten(x, mask, all_sum=lambda t: t), core.masked_whiten(x, mask), tol=1e-6)


def test_policy_loss_and_its_gradient_stay_finite_with_a_minus_inf_log_prob_at_padding():
    # position 2 is padding whose log-prob is -inf under both policies: inf - inf is NaN before masking.
    # The real positions: ratio (1.5, 0.5), advantages (1, 1), eps 0.2 -> max(-1.5, -1.2) = -1.2 and
    # max(-0.5, -0.8) = -0.5; loss -1.7 / 2; gradient -A r / 2 at position 1 = -0.25, 0 elsewhere
    new = torch.tensor([[math.log(1.5), math.log(0.5), -math.inf]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, -math.inf]])
    loss, stats = core.policy_loss(new, old, torch.ones(1, 3), torch.tensor([[1, 1, 0]]), 0.2)
    loss.backward()
    close(loss, -1.7 / 2)
    close(stats["approxkl"], (0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 2)
    close(new.grad, [[0.0, -0.25, 0.0]])


def test_broadcast_to_tokens_gives_each_real_token_its_sequences_value():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    expected = torch.tensor([[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(core.broadcast_to_tokens(torch.tensor([0.5, -2.0, 1.0]), mask), expected)


def test_masked_whiten():
    # (1, 2, 3): mean 2, unbiased var 1 -> (-1, 0, 1)
    close(core.masked_whiten(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3)), [-1.0, 0.0, 1.0], tol=1e-4)
    # (1, 3, [100]): mean 2, unbiased var ((1 + 1) / 2) * 2 / 1 = 2 -> (-1/sqrt2, 1/sqrt2, 0)
    close(core.masked_whiten(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])),
          [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0], tol=1e-4)
    # shift_mean=False keeps the mean: (1, 2, 3) -> (-1, 0, 1) + 2
    close(core.masked_whiten(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), shift_mean=False), [1.0, 2.0, 3.0], tol=1e-4)


def test_masked_whiten_over_processes():
    # this process holds (1, 2, [pad]), another (3): together mean 2, unbiased var 1 -> (-1, 0, [0]) here
    # (alone it would be (-1/sqrt2, 1/sqrt2, 0)). The other's part of each sum: its (sum, count) = (3, 1),
    # then its squared distance from the mean, (3 - 2)^2 = 1.
    others = iter([torch.tensor([3.0, 1.0]), torch.tensor([1.0])])
    x, mask = torch.tensor([1.0, 2.0, 100.0]), torch.tensor([1, 1, 0])
    close(core.masked_whiten(x, mask, all_sum=lambda t: t + next(others).to(t.dtype)), [-1.0, 0.0, 0.0], tol=1e-4)
    # with no other process, the sums are this process's own
    close(core.masked_whiten(x, mask, all_sum=lambda t: t), core.masked_whiten(x, mask), tol=1e-6)


def test_policy_loss_clips_the_ratio():
    # ratio (1.5, 0.5, 1.0), advantages (1, 1, -1), eps 0.2:
    #   0: max(-1.5, -1.2) = -1.2 (clipped)   1: max(-0.5, -0.8) = -0.5   2: max(1, 1) = 1
    # loss = (-1.2 - 0.5 + 1) / 3 = -0.233333; clipfrac 1/3
    # approxkl = mean((r - 1) - ln r) = (0.5 - ln 1.5 + -0.5 - ln 0.5 + 0) / 3 = 0.0958940
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    loss, stats = core.policy_loss(new, old, torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), 0.2)
    close(loss, -0.7 / 3)
    close(stats["clipfrac"], 1 / 3)
    close(stats["approxkl"], (0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 3)
    # masking position 0 out: (-0.5 + 1) / 2 = 0.25, nothing clipped
    loss, stats = core.policy_loss(new, old, torch.tensor([[1.0, 1.0, -1.0]]), torch.tensor([[0, 1, 1]]), 0.2)
    close(loss, 0.25)
    close(stats["clipfrac"], 0.0)


def test_policy_loss_gradient_is_zero_once_clipped():
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    loss, _ = core.policy_loss(new, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), 0.2)
    loss.backward()
    # d/dlogp of -A r / 3 = -A r / 3: position 0 is clipped (0), 1: -0.5/3, 2: +1/3
    close(new.grad, [[0.0, -0.5 / 3, 1 / 3]])


def test_policy_loss_clips_a_falling_ratio_of_a_bad_token_too():
    # ratio 0.5 on both, advantages (-1, +1), eps 0.2: the trust region holds on both sides
    #   0: max(0.5, 0.8) = 0.8 (clipped at 1 - eps: no gradient)   1: max(-0.5, -0.8) = -0.5
    # loss = (0.8 - 0.5) / 2 = 0.15; clipfrac 1/2; d/dlogp at 1: -A r / 2 = -0.25
    new = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    loss, stats = core.policy_loss(new, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), 0.2)
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    loss.backward()
    close(new.grad, [[0.0, -0.25]])


def test_value_loss_clips_around_rollout_values():
    # old 0, new (0.5, -0.1, 0.3), returns (1, 0, -1), clip 0.2 -> clipped values (0.2, -0.1, 0.2)
    #   0: max((0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64) = 0.64 (clipped)  1: 0.01  2: max(1.69, 1.44) = 1.69
    # loss = 0.5 * (0.64 + 0.01 + 1.69) / 3 = 0.39; clipfrac 1/3
    loss, stats = core.value_loss(torch.tensor([[0.5, -0.1, 0.3]]), torch.zeros(1, 3),
                                  torch.tensor([[1.0, 0.0, -1.0]]), torch.ones(1, 3), 0.2)
    close(loss, 0.39)
    close(stats["clipfrac"], 1 / 3)
    # new 0.6 for return 1 is clipped too: (0.2-1)^2 = 0.64 > 0.16; position 2 still not -> 2/3
    _, stats = core.value_loss(torch.tensor([[0.5, 0.6, 0.3]]), torch.zeros(1, 3),
                               torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), 0.2)
    close(stats["clipfrac"], 2 / 3)


def test_the_clip_ranges_are_the_ones_given():
    # policy: ratio (1.15, 1.15), advantages (1, 1): clipped at 1.1 with eps 0.1 (loss -1.1), not with 0.2 (-1.15)
    new = torch.log(torch.tensor([[1.15, 1.15]]))
    close(core.policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.1)[0], -1.1)
    close(core.policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)[0], -1.15)
    # value: old 0, new 0.5, return 1: clipped to 0.3 with 0.3 (0.5 * 0.49), to 0.2 with 0.2 (0.5 * 0.64)
    args = torch.tensor([[0.5]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    close(core.value_loss(*args, 0.3)[0], 0.245)
    close(core.value_loss(*args, 0.2)[0], 0.32)


def test_approx_kl_is_the_k3_estimate_of_kl_old_to_new():
    # ratio 2 on one token: (r - 1) - ln r = 1 - ln 2 = 0.30685 (k3, never negative); -ln r alone (k1) is -0.693
    _, stats = core.policy_loss(torch.log(torch.tensor([[2.0]])), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    close(stats["approxkl"], 1 - math.log(2))


def test_whitening_values_that_are_all_equal_gives_zeros_not_nan():
    # variance 0: the eps keeps 0 / sqrt(0 + eps) finite
    close(core.masked_whiten(torch.full((3,), 2.5), torch.ones(3)), [0.0, 0.0, 0.0])
    close(core.masked_whiten(torch.full((3,), 2.5), torch.ones(3), shift_mean=False), [2.5, 2.5, 2.5])


def test_adaptive_kl_controller_moves_beta_towards_the_target_and_round_trips():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 9: error 9/6 - 1 = 0.5 clipped to 0.2 -> 0.1 * (1 + 0.2 * 10 / 100) = 0.102
    ctl.update(9.0, n_episodes=10)
    assert ctl.value == pytest.approx(0.102)
    # KL 5.4: error -0.1 -> 0.102 * (1 - 0.1 * 0.1) = 0.10098
    ctl.update(5.4, n_episodes=10)
    assert ctl.value == pytest.approx(0.10098)
    # KL 0: error -1 clipped to -0.2 -> 0.10098 * (1 - 0.2 * 0.1) = 0.0989604
    ctl.update(0.0, n_episodes=10)
    assert ctl.value == pytest.approx(0.0989604)
    other = core.AdaptiveKLController(0.5, target=6.0, horizon=100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = core.FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3


def test_truncate_after_eos_keeps_the_first_eos_and_pads_the_rest():
    # eos = 2, pad = 0: row 0 ends at index 1; row 1 never ends (all 3 kept); row 2 has eos first
    ids = torch.tensor([[5, 2, 7], [5, 6, 7], [2, 2, 9]])
    out, mask = core.truncate_after_eos(ids, eos_token_id=2, pad_token_id=0)
    assert out.tolist() == [[5, 2, 0], [5, 6, 7], [2, 0, 0]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]


def test_rloo_baseline_leaves_exactly_one_out():
    # two prompts, k = 3 samples each: rewards (1, 2, 6) and (0, 0, 3)
    # sample 0: baseline = (2 + 6) / 2 = 4 -> A = 1 - 4 = -3; sample 1: (1 + 6) / 2 = 3.5 -> -1.5;
    # sample 2: (1 + 2) / 2 = 1.5 -> 4.5. Second prompt: 0 - 1.5, 0 - 1.5, 3 - 0 = (-1.5, -1.5, 3)
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    close(core.rloo_advantages(rewards, 3), [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    # a sample's own reward never enters its baseline: raising r_0 changes A_1 and A_2, and A_0 by exactly as much
    raised = core.rloo_advantages(rewards + torch.tensor([1.0, 0, 0, 0, 0, 0]), 3)
    close(raised[:3] - core.rloo_advantages(rewards, 3)[:3], [1.0, -0.5, -0.5])


def test_frac_zero_spread_counts_the_prompts_whose_samples_all_scored_alike():
    # groups (1, 1), (2, 2 + 1e-9) alike to rounding, (3, 4) apart; (1e6, 1e6 + 0.5) alike only in relative terms
    close(core.frac_zero_spread(torch.tensor([1.0, 1.0, 2.0, 2.0 + 1e-9, 3.0, 4.0], dtype=torch.float64), 2), 2 / 3)
    close(core.frac_zero_spread(torch.tensor([1e6, 1e6 + 0.5, 0.0, 0.5]), 2), 1 / 2)


def test_grpo_normalises_within_each_group():
    # group (1, 2, 6): mean 3, unbiased std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7)
    # group (5, 5, 5): std 0 -> all advantages 0 (eps keeps the division finite)
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    s7 = math.sqrt(7)
    close(core.grpo_advantages(rewards, 3, eps=0.0)[:3], [-2 / s7, -1 / s7, 3 / s7])
    close(core.grpo_advantages(rewards, 3)[3:], [0.0, 0.0, 0.0])
    # invariant to a shift and a positive scale of one group's rewards
    close(core.grpo_advantages(rewards * 10 + 7, 3, eps=0.0)[:3], [-2 / s7, -1 / s7, 3 / s7])
