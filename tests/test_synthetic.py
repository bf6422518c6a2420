"""The synthetic task's gold judge and simulated annotators behave as documented."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from align import synthetic as syn

BEST = syn.Attributes("on", "polite", "concise", "proper")


def mean_gold(attributes, n=120, seed=0):
    rng = random.Random(seed)
    prompts = syn.make_prompts(n, seed=seed)
    return statistics.mean(syn.gold_score(p, syn.sample_response(p, rng, attributes)) for p in prompts)


@pytest.mark.parametrize(
    ("worse", "why"),
    [
        (syn.Attributes("off", "polite", "concise", "proper"), "drifting off topic"),
        (syn.Attributes("mixed", "polite", "concise", "proper"), "half off topic"),
        (syn.Attributes("on", "rude", "concise", "proper"), "rudeness"),
        (syn.Attributes("on", "neutral", "concise", "proper"), "no politeness"),
        (syn.Attributes("on", "polite", "rambling", "proper"), "rambling"),
        (syn.Attributes("on", "polite", "concise", "trails"), "trailing off"),
    ],
)
def test_each_bad_attribute_lowers_the_gold_score(worse, why):
    assert mean_gold(worse) < mean_gold(BEST) - 0.5, why


def test_gold_scores_of_random_responses_spread_widely():
    rng = random.Random(1)
    prompts = syn.make_prompts(500, seed=1)
    scores = [syn.gold_score(p, syn.sample_response(p, rng)) for p in prompts]
    assert statistics.pstdev(scores) > 1.5
    assert min(scores) < -3 < 3 < max(scores)


def test_gold_judge_reads_words_not_substrings():
    # "ugh" is a rude marker, but not inside "dough" or "through".
    prompt = "Tell me about bread."
    assert syn.gold_score(prompt, "Knead the bread dough through and through. Good luck!") > syn.gold_score(
        prompt, "Ugh. Knead the bread dough through and through. Good luck!"
    )


def test_heldout_prompts_are_unseen_combinations():
    train, heldout = set(syn.prompt_pool("train")), set(syn.prompt_pool("heldout"))
    assert train and heldout and not train & heldout
    assert set(syn.make_prompts(50, split="heldout")) <= heldout
    assert all(syn.topic_of(p) is not None for p in train | heldout)


@pytest.mark.parametrize("target", [0.73, 0.9])
def test_annotator_noise_gives_the_requested_agreement(target):
    noise = syn.noise_for_agreement(target)
    a, b = syn.SimulatedAnnotator(noise, seed=1), syn.SimulatedAnnotator(noise, seed=2)
    rng = random.Random(3)
    agree = total = 0
    for prompt in syn.make_prompts(1500, seed=3):
        responses = [syn.sample_response(prompt, rng) for _ in range(2)]
        golds = [syn.gold_score(prompt, r) for r in responses]
        if golds[0] == golds[1]:
            continue
        ra, rb = a.rank(prompt, responses), b.rank(prompt, responses)
        agree += (ra[0] < ra[1]) == (rb[0] < rb[1])
        total += 1
    assert agree / total == pytest.approx(target, abs=0.035)


def test_noiseless_annotator_ranks_by_gold():
    prompt = "Tell me about tea."
    rng = random.Random(0)
    responses = [syn.sample_response(prompt, rng) for _ in range(6)]
    ranks = syn.SimulatedAnnotator(0.0).rank(prompt, responses)
    golds = [syn.gold_score(prompt, r) for r in responses]
    for i, j in itertools.permutations(range(6), 2):
        assert (golds[i] > golds[j]) == (ranks[i] < ranks[j])


def test_make_rankings_shapes_and_multiple_annotators():
    rankings = syn.make_rankings(40, k=4, agreement=0.73, seed=0, annotators=2)
    assert len(rankings) == 40
    assert all(len(r.responses) == 4 and sorted(set(r.ranks))[0] == 0 for r in rankings)
    # Two annotators per prompt: consecutive rankings share the prompt and responses.
    assert rankings[0].prompt_id == rankings[1].prompt_id and rankings[0].annotator != rankings[1].annotator
    assert rankings[0].responses == rankings[1].responses
    assert all(len(r.ordered_pairs()) <= 6 for r in rankings)


def test_gold_features_count_what_the_judge_scores():
    prompt = "Tell me about tea."
    rude_rambling = ("Ugh, fine. Loose tea leaves need room to open up in the pot. The sun is a star made mostly of "
                     "hydrogen and helium. By the way, my cousin has a blue car. Also, I was thinking about lunch "
                     "earlier. Loose tea leaves need room to open up in the pot. Try to keep up. and then the")
    f = syn.gold_features(prompt, rude_rambling)
    # on topic (tea), one sentence about the sun, 2 rude phrases ("ugh", "keep up"), 58 words (28 beyond 30),
    # the tea sentence said twice, no closing punctuation
    assert f == {"on_topic": 1.0, "off_topic_sentences": 1.0, "polite": 0.0, "rude_phrases": 2.0,
                 "excess_words": 28.0, "repeated_sentences": 1.0, "trails_off": 1.0, "closing": 0.0}
    # -1 + 3 - 1 - 2 - 0.04 * 28 - 0.75 - 1.5
    assert syn.gold_score(prompt, rude_rambling) == pytest.approx(-4.37)
