"""A top-m ranking (only the best m of K put in order, the rest an unordered group below)
reaches the K-wise loss as exactly the comparisons the annotator made."""

import json

import pytest
import torch

from align.formats import Ranking, read_kwise
from reward.data import RankingCollator, RankingDataset, expand_to_pairs, with_pairs
from reward.losses import kwise_ranking_loss

# Responses a, b, c, d; the annotator put c first and a second, and left b and d unranked.
TOP_2_OF_4 = {"prompt": "which is best?", "responses": ["a", "b", "c", "d"], "ranks": [1, 2, 0, 2], "ranked": 2}
STATED = {(2, 0), (2, 1), (2, 3), (0, 1), (0, 3)}  # c > a, and each of c, a over b and over d


def _ranking_as_exported(tmp_path) -> Ranking:
    """The ranking as the annotation app's kwise export writes it and the reward stage reads it."""
    path = tmp_path / "top2.jsonl"
    path.write_text(json.dumps(TOP_2_OF_4) + "\n")
    (ranking,) = read_kwise(path)
    assert ranking.ranked == 2
    return ranking


def test_a_top_2_of_4_ranking_contributes_exactly_its_5_ordered_pairs(tmp_path, tiny_random_model):
    from align.modeling import load_tokenizer

    ranking = _ranking_as_exported(tmp_path)
    assert with_pairs([ranking]) == [ranking]
    tok = load_tokenizer(tiny_random_model)
    batch = RankingCollator(tok.pad_token_id)([RankingDataset([ranking], tok, max_length=64)[0]])
    pairs = list(zip(batch.winners.tolist(), batch.losers.tolist()))
    assert len(pairs) == 5 and set(pairs) == STATED
    assert (1, 3) not in pairs and (3, 1) not in pairs  # nothing about the order of the two unranked
    # The pairwise expansion (one K = 2 ranking per pair) states the same five.
    expanded = {(p.responses[0], p.responses[1]) for p in expand_to_pairs([ranking], seed=0)}
    assert expanded == {(ranking.responses[w], ranking.responses[l]) for w, l in STATED}


@pytest.mark.parametrize("rewards", [[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, 0.0, 4.0]])
def test_the_loss_does_not_depend_on_the_order_of_the_unranked(tmp_path, tiny_random_model, rewards):
    """Swapping the rewards of the two unranked responses leaves the loss unchanged: no
    term compares them. Its value is the mean over the five stated pairs."""
    from align.modeling import load_tokenizer

    ranking = _ranking_as_exported(tmp_path)
    tok = load_tokenizer(tiny_random_model)
    batch = RankingCollator(tok.pad_token_id)([RankingDataset([ranking], tok, max_length=64)[0]])

    def loss(r: list[float]) -> float:
        return kwise_ranking_loss(torch.tensor(r), batch.winners, batch.losers, batch.pair_group, num_groups=1).item()

    swapped = [rewards[0], rewards[3], rewards[2], rewards[1]]
    assert loss(rewards) == pytest.approx(loss(swapped), abs=1e-7)
    expected = sum(-torch.nn.functional.logsigmoid(torch.tensor(rewards[w] - rewards[l])).item() for w, l in STATED) / 5
    assert loss(rewards) == pytest.approx(expected, abs=1e-6)
