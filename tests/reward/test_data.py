"""Prompt-level split, the K-wise batch layout, the pairwise expansion and repeated responses."""

import json
import os

import pytest

from align.formats import Ranking, merge_repeated_responses
from align.synthetic import make_rankings
from reward.data import (
    RankingCollator,
    RankingDataset,
    expand_to_pairs,
    load_reward_data,
    prompt_key,
    split_by_prompt,
    with_pairs,
)


def conversation(first: str, *later: str) -> list[dict]:
    msgs = [{"role": "user", "content": first}]
    for i, text in enumerate(later):
        msgs += [{"role": "assistant", "content": f"a{i}"}, {"role": "user", "content": text}]
    return msgs


def test_split_by_prompt_leaks_no_prompt_across():
    # 3 annotators per prompt, and each prompt repeated across cycles of the pool
    rankings = make_rankings(900, k=3, annotators=3, seed=1)
    train, held = split_by_prompt(rankings, 0.2, seed=0)
    assert len(train) + len(held) == len(rankings)
    train_prompts, held_prompts = {r.prompt for r in train}, {r.prompt for r in held}
    assert held and train
    assert not train_prompts & held_prompts
    # every annotator's ranking of a held-out prompt is held out with it
    for r in rankings:
        assert (r.prompt in held_prompts) == (r in held)


def test_split_keeps_a_conversation_tree_together():
    # deeper ranked groups of one OpenAssistant tree share its first user turn
    rankings = [
        Ranking(conversation(f"q{t}", *[f"follow{d}" for d in range(depth)]), ["x", "y"], [0, 1])
        for t in range(20)
        for depth in range(3)
    ]
    train, held = split_by_prompt(rankings, 0.3, seed=3)
    first_turns = lambda rs: {r.prompt[0]["content"] for r in rs}  # noqa: E731
    assert not first_turns(train) & first_turns(held)
    assert len({prompt_key(r) for r in held}) == 6  # 30% of 20 trees, each with all 3 groups
    assert len(held) == 18


def test_a_question_as_text_and_as_a_one_turn_conversation_stays_on_one_side():
    rankings = [Ranking(f"q{i}", ["x", "y"], [0, 1]) for i in range(20)]
    rankings += [Ranking([{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}],
                         ["z", "w"], [0, 1]) for i in range(20)]
    train, held = split_by_prompt(rankings, 0.3, seed=3)
    question = lambda r: r.prompt if isinstance(r.prompt, str) else r.prompt[1]["content"]  # noqa: E731
    assert held and not {question(r) for r in train} & {question(r) for r in held}
    assert len(held) == 12  # 6 questions, each in both forms


def test_split_is_deterministic_for_a_seed():
    rankings = make_rankings(200, seed=2)
    a, b = split_by_prompt(rankings, 0.1, 5), split_by_prompt(rankings, 0.1, 5)
    assert [r.prompt for r in a[1]] == [r.prompt for r in b[1]]


def test_the_split_holds_out_the_rounded_fraction_of_prompts_keeps_one_for_training_and_follows_the_seed():
    def prompts(n: int) -> list[Ranking]:
        return [Ranking(prompt=f"q{i}", responses=["a", "b"], ranks=[0, 1]) for i in range(n)]

    # 10 prompts at 0.25: 2.5 rounds to 2 held out (round half to even), 0.29: 2.9 to 3 (not cut down to 2)
    assert [len(split_by_prompt(prompts(10), f, 0)[1]) for f in (0.25, 0.29, 0.05)] == [2, 3, 1]  # at least 1
    # a fraction that would hold out every prompt still leaves one to train on
    train, held = split_by_prompt(prompts(3), 0.9, 0)
    assert (len(train), len(held)) == (1, 2)
    # another seed, another held-out set (8 of the 45 ways to hold out 2 of 10 would do by chance)
    held_sets = {frozenset(r.prompt for r in split_by_prompt(prompts(10), 0.2, seed)[1]) for seed in range(8)}
    assert len(held_sets) > 1


def test_the_split_is_the_same_in_every_process_for_a_seed():
    """Python salts string hashes per process: a split that followed a set's order would hold out
    other prompts on another rank, or after a resume."""
    import subprocess
    import sys

    code = ("from align.synthetic import make_rankings\nfrom reward.data import split_by_prompt\n"
            "print([r.prompt for r in split_by_prompt(make_rankings(60, seed=2), 0.2, 5)[1]])")
    held_out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": str(salt)}).stdout for salt in (1, 2, 3)}
    assert len(held_out) == 1 and held_out != {"[]\n"}


def test_held_out_rankings_without_a_pair_are_left_out_and_counted(tmp_path):
    from align.exports import write_kwise
    from reward.config import DataSection

    ranked = [Ranking(prompt=f"q{i}", responses=["x", "y"], ranks=[0, 1]) for i in range(20)]
    tied = [Ranking(prompt=f"t{i}", responses=["x", "y"], ranks=[0, 0]) for i in range(20)]
    path = tmp_path / "rankings.jsonl"
    write_kwise(ranked + tied, path)
    data = load_reward_data(DataSection(format="kwise", path=str(path), eval_fraction=0.5))
    held_out_tied = [r for r in split_by_prompt(ranked + tied, 0.5, DataSection().seed)[1] if r.prompt.startswith("t")]
    assert held_out_tied and data.held_out_without_preference == len(held_out_tied)
    assert data.eval and all(r.ranks != [0, 0] for r in data.eval + data.train)


def test_rankings_without_pairs_are_dropped():
    rs = [Ranking("p", ["a", "b"], [0, 0]), Ranking("p", ["a", "b"], [1, 0])]
    assert with_pairs(rs) == [rs[1]]


def test_batch_flattens_each_response_once_with_pairs_pointing_at_them(tiny_random_model):
    from align.modeling import load_tokenizer

    tok = load_tokenizer(tiny_random_model)
    rankings = [
        Ranking("first prompt", ["r0", "a much longer response r1", "r2"], [2, 0, 1]),
        Ranking("second prompt", ["s0", "s1"], [0, 0]),  # a tie: no pair, still one batch element
        Ranking("third", ["t0", "t1"], [1, 0]),
    ]
    ds = RankingDataset(rankings, tok, max_length=64)
    batch = RankingCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert batch.num_responses == 7 and batch.num_groups == 3
    # pairs (winner, loser): ranking 0 -> (1,0), (1,2), (2,0); ranking 2 -> responses 5,6: (6,5)
    pairs = sorted(zip(batch.winners.tolist(), batch.losers.tolist(), batch.pair_group.tolist()))
    assert pairs == [(1, 0, 0), (1, 2, 0), (2, 0, 0), (6, 5, 2)]
    # every response once, in order, whole: its prompt (encoded once per ranking) + its continuation
    assert batch.full_sequences() == [s for i in range(3) for s in ds[i].responses]
    assert batch.prompt_ids.shape[0] == 3 and batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 2, 2]
    # continuations right-padded with a pad distinct from eos, each ending its real tokens with eos;
    # prompts left-padded, so every continuation starts right after its prompt's last token
    assert tok.pad_token_id != tok.eos_token_id
    for row, n in zip(batch.continuation_ids, batch.continuation_mask.sum(1).tolist()):
        assert row[n - 1].item() == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
    for row, n in zip(batch.prompt_ids, batch.prompt_mask.sum(1).tolist()):
        assert (row[: len(row) - n] == tok.pad_token_id).all() and (row[len(row) - n :] != tok.pad_token_id).all()


def test_pairwise_expansion_makes_one_element_per_pair():
    rankings = make_rankings(10, k=4, seed=0)
    pairs = expand_to_pairs(rankings, seed=0)
    assert len(pairs) == sum(len(r.ordered_pairs()) for r in rankings)
    assert all(p.ranks == [0, 1] and len(p.responses) == 2 for p in pairs)
    # forward passes: K-wise forwards 4 per ranking, pairwise 2 per pair (each response K-1 = 3 times)
    assert sum(len(p.responses) for p in pairs) == 3 * sum(len(r.responses) for r in rankings)


def test_too_long_texts_keep_the_response_end_and_eos(tiny_random_model):
    from align.modeling import load_tokenizer
    from reward.model import prepare_tokenizer

    tok = load_tokenizer(tiny_random_model)
    prepare_tokenizer(tok)
    ds = RankingDataset([Ranking("a long prompt " * 20, ["a long response " * 20, "short"], [0, 1])], tok, max_length=12)
    long_ids, short_ids = ds[0].responses
    assert len(long_ids) == 12 and long_ids[-1] == tok.eos_token_id
    assert tok.decode(long_ids[:-1]).strip().endswith("response")
    # counted for the stage's one line: rankings holding a cut text
    fits = Ranking("hi", ["a", "b"], [0, 1])
    assert ds.truncated == 1 and RankingDataset([fits, fits], tok, max_length=64).truncated == 0


def test_annotation_project_is_read_through_the_app_export(tmp_path):
    from align.commands.sources import register_ranking_sources
    from annotation.db import open_db
    from annotation.services import create_project, export_rankings, get_project, import_rankings
    from reward.config import DataSection

    url = f"sqlite:///{tmp_path / 'ann.db'}"
    make_session = open_db(url)
    rankings = make_rankings(40, k=3, seed=3, annotators=2)
    with make_session() as db:
        import_rankings(db, create_project(db, "rm", k=3), rankings, source="sim")
    register_ranking_sources()
    data = load_reward_data(DataSection(format="annotation", db_url=url, project="rm", eval_fraction=0.25))
    with make_session() as db:
        exported = export_rankings(db, get_project(db, "rm"))
    assert exported and len(data.train) + len(data.eval) == len(exported)
    assert not {prompt_key(r) for r in data.train} & {prompt_key(r) for r in data.eval}
    as_tuples = lambda rs: sorted((r.prompt, tuple(r.responses), tuple(r.ranks), r.annotator) for r in rs)  # noqa: E731
    # (as every source is read: a response text a ranking lists twice is kept once, at its best rank)
    assert as_tuples(data.train + data.eval) == as_tuples(map(merge_repeated_responses, exported))
    assert data.with_repeats == sum(len(set(r.responses)) < len(r.responses) for r in exported)
    originals = {(r.prompt, tuple(r.responses), tuple(r.ranks)) for r in rankings}
    assert all((r.prompt, tuple(r.responses), tuple(r.ranks)) in originals for r in exported)


def test_reading_an_annotation_database_never_creates_one(tmp_path):
    from align.commands.sources import register_ranking_sources
    from align.errors import UserError
    from reward.config import DataSection

    register_ranking_sources()
    typo, garbage = tmp_path / "typo.db", tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    for url, expected in [(f"sqlite:///{typo}", f"database not found: {typo}"),
                          (f"sqlite:///{garbage}", "file is not a database"),
                          ("nonsense", "is not a database URL")]:
        with pytest.raises(UserError, match=expected):
            load_reward_data(DataSection(format="annotation", db_url=url, project="rm"))
    assert not typo.exists() and garbage.read_bytes() == b"not a database" * 100


def test_mismatch_pairs_show_each_top_response_under_the_next_rankings_prompt(tiny_random_model):
    from align.chat import render_example
    from align.modeling import load_tokenizer

    tok = load_tokenizer(tiny_random_model)
    rankings = [Ranking(f"prompt {i}", [f"bad {i}", f"best {i}", f"mid {i}"], [2, 0, 1]) for i in range(6)]
    ds = RankingDataset(rankings, tok, max_length=64)
    assert all(item.top == 1 and item.prompt_len > 0 for item in ds.items)

    batch = RankingCollator(tok.pad_token_id, mismatch=True)([ds[i] for i in (4, 0, 2)])
    assert batch.num_responses == 3 * 3 + 3  # one extra forward per ranking
    assert batch.prompt_ids.shape[0] == 3  # under prompts the batch encodes anyway
    assert batch.mismatch_winners.tolist() == [1, 4, 7]  # each ranking's top response, under its own prompt
    assert batch.mismatch_losers.tolist() == [9, 10, 11]
    sequences = batch.full_sequences()
    # ...and under the next ranking's prompt in the batch, cyclically: each prompt once on each side
    for loser, (i, j) in zip(batch.mismatch_losers.tolist(), [(4, 0), (0, 2), (2, 4)]):
        expected = render_example(tok, f"prompt {j}", f"best {i}")
        assert sequences[loser] == tok(expected, add_special_tokens=False)["input_ids"]
    # the same rankings in another order (the next epoch's shuffle) pair differently
    again = RankingCollator(tok.pad_token_id, mismatch=True)([ds[i] for i in (0, 4, 2)]).full_sequences()
    assert again[9] == tok(render_example(tok, "prompt 4", "best 0"), add_special_tokens=False)["input_ids"]
    # without the option nothing is added
    assert RankingCollator(tok.pad_token_id)([ds[i] for i in (4, 0, 2)]).num_responses == 9


def test_no_mismatch_pair_between_rankings_of_the_same_prompt_or_too_long(tiny_random_model):
    from align.modeling import load_tokenizer

    tok = load_tokenizer(tiny_random_model)
    same = [Ranking("one prompt", ["a", "b"], [0, 1], annotator=f"ann{i}") for i in range(4)]
    batch = RankingCollator(tok.pad_token_id, mismatch=True)(RankingDataset(same, tok, max_length=64).items)
    assert batch.num_responses == 8 and batch.mismatch_winners.numel() == 0
    # a longer prompt would push the response past max_length: that pair is left out
    rankings = [Ranking("short", ["a longer winning answer", "b"], [0, 1]),
                Ranking("a much longer prompt " * 3, ["c", "d"], [1, 0])]
    ds = RankingDataset(rankings, tok, max_length=64)
    fits = max(len(s) for s in ds[1].responses)
    batch = RankingCollator(tok.pad_token_id, mismatch=True, max_length=fits)(ds.items)
    assert batch.mismatch_winners.tolist() == [3]  # only ranking 1's top (response d) under the short prompt
    assert all(len(s) <= fits for s in batch.full_sequences())


@pytest.mark.parametrize("responses, ranks, ranked, kept, new_ranks, new_ranked", [
    (["a", "b", "a"], [0, 1, 2], None, ["a", "b"], [0, 1], None),  # the lower copy goes
    (["b", "a", "c", "a"], [2, 0, 1, 3], None, ["b", "a", "c"], [2, 0, 1], None),  # order of the rest kept
    (["a", "a", "b"], [0, 0, 1], None, ["a", "b"], [0, 1], None),  # tied copies: one
    # top-2 of 4 (b and c unordered below): a's copies at ranks 0 and 1 -> a top-1 of 3, b and c tied below
    (["a", "b", "a", "c"], [0, 2, 1, 2], 2, ["a", "b", "c"], [0, 1, 1], 1),
    # top-2 of 3 whose one unordered response repeats a ranked one: a full ranking of 2
    (["a", "b", "a"], [0, 1, 2], 2, ["a", "b"], [0, 1], None),
])
def test_a_repeated_response_is_kept_once_at_its_best_rank(responses, ranks, ranked, kept, new_ranks, new_ranked):
    r = Ranking(prompt="p", responses=responses, ranks=ranks, ranked=ranked, annotator="ann", prompt_id="7")
    merged = merge_repeated_responses(r)
    assert (merged.responses, merged.ranks, merged.ranked) == (kept, new_ranks, new_ranked)
    assert (merged.prompt, merged.annotator, merged.prompt_id) == ("p", "ann", "7")


def test_rankings_without_repeats_are_read_unchanged_and_repeats_counted(tmp_path):
    from align.exports import write_kwise
    from reward.config import DataSection

    plain = [Ranking(prompt=f"q{i}", responses=["x", "y", "z"], ranks=[0, 1, 2]) for i in range(8)]
    assert all(merge_repeated_responses(r) is r for r in plain)
    repeated = [Ranking(prompt=f"r{i}", responses=["same", "other", "same"], ranks=[0, 1, 2]) for i in range(4)]
    path = tmp_path / "rankings.jsonl"
    write_kwise(plain + repeated, path)
    data = load_reward_data(DataSection(format="kwise", path=str(path), eval_fraction=0.25))
    assert data.with_repeats == 4
    every = data.train + data.eval
    assert len(every) == 12 and all(len(set(r.responses)) == len(r.responses) for r in every)
    assert sorted(len(r.responses) for r in every) == [2] * 4 + [3] * 8


def test_an_all_revisions_export_trains_on_each_annotators_latest_ranking(tmp_path, caplog):
    # the annotation app's --all-revisions kwise export: alice revised her ranking of q1 twice; bob ranked once
    from reward.data import read_source

    rows = [{"prompt": "q?", "prompt_id": "q1", "responses": ["a", "b", "c"], "ranks": ranks, "annotator": who,
             "revision": rev} for who, ranks, rev in (("alice", [0, 1, 2], 1), ("alice", [2, 1, 0], 2),
                                                      ("bob", [1, 0, 2], 1), ("alice", [0, 2, 1], 3))]
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="align"):
        kept = read_source("kwise", path)
    assert sorted((r.annotator, r.ranks) for r in kept) == [("alice", [0, 2, 1]), ("bob", [1, 0, 2])]
    assert "2 earlier revision(s)" in caplog.text


@pytest.mark.parametrize("revision", ["1", 0])
def test_a_revision_that_is_not_a_whole_number_from_1_stops_the_read_rather_than_leave_rankings_out(tmp_path, caplog,
                                                                                                   revision):
    # a revision "1" beside revision 1 read as an earlier revision, and a revision 0 as earlier than any
    from align.errors import UserError
    from reward.data import read_source

    rows = [{"prompt": f"p{i}", "responses": ["a", "b"], "ranks": [0, 1], "annotator": "ann",
             "revision": 1 if i < 3 else revision} for i in range(6)]
    path = tmp_path / "revs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="align"), pytest.raises(
            UserError, match=rf"^{path}:4: .*revision must be a whole number from 1, got {revision!r}"):
        read_source("kwise", path)
    assert "left out" not in caplog.text


def test_synthetic_held_out_labels_are_the_gold_judges_one_per_distinct_ranking():
    # noisy annotators, three per prompt: their rankings of a held-out prompt disagree with the gold
    # judge and with each other, and the held-out accuracy must be against the gold order, once per prompt
    from reward.config import DataSection
    from reward.data import gold_ranks

    data = load_reward_data(DataSection(format="synthetic", num_rankings=12, num_eval_rankings=30, k=4,
                                        agreement=0.6, annotators_per_prompt=3))
    key = lambda r: (r.prompt, tuple(r.responses))  # noqa: E731
    annotated = data.eval_annotator
    assert annotated and len({key(r) for r in annotated}) < len(annotated)  # the precondition: several per prompt
    assert any(r.ranks != gold_ranks(r.prompt, r.responses) for r in annotated)  # ... that disagree with gold
    assert data.eval_label == "gold" and data.eval
    assert all(r.annotator == "gold" and r.ranks == gold_ranks(r.prompt, r.responses) for r in data.eval)
    assert len({key(r) for r in data.eval}) == len(data.eval)
    assert {key(r) for r in data.eval} <= {key(r) for r in annotated}


def test_a_separate_eval_file_is_read_with_repeated_responses_kept_once(tmp_path):
    from align.exports import write_kwise
    from reward.config import DataSection

    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_kwise([Ranking(prompt=f"train {i}", responses=["x", "y"], ranks=[0, 1]) for i in range(4)], train_path)
    write_kwise([Ranking(prompt="held out", responses=["a", "b", "a"], ranks=[0, 1, 2]),
                 Ranking(prompt="held out too", responses=["c", "d"], ranks=[1, 0])], eval_path)
    data = load_reward_data(DataSection(format="kwise", path=str(train_path), eval_path=str(eval_path)))
    by_prompt = {r.prompt: r for r in data.eval}
    assert set(by_prompt) == {"held out", "held out too"} and len(data.train) == 4
    assert (by_prompt["held out"].responses, by_prompt["held out"].ranks) == (["a", "b"], [0, 1])
    assert (by_prompt["held out too"].responses, by_prompt["held out too"].ranks) == (["c", "d"], [1, 0])


def test_a_held_out_file_of_rankings_without_a_preference_is_counted_with_the_training_files(tmp_path):
    from align.errors import UserError
    from align.exports import write_kwise
    from reward.config import DataSection

    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_kwise([Ranking(prompt=f"train {i}", responses=["x", "y"], ranks=[0, 1]) for i in range(2)], train_path)
    write_kwise([Ranking(prompt=f"tied {i}", responses=["a", "b"], ranks=[0, 0]) for i in range(5)], eval_path)
    with pytest.raises(UserError, match=r"2 training and 0 held-out rankings with pairs; need both > 0 \(5 of the 7 "
                                        r"rankings state no preference"):
        load_reward_data(DataSection(format="kwise", path=str(train_path), eval_path=str(eval_path)))


def test_an_annotation_database_that_cannot_be_opened_is_said_of_its_key_without_the_password():
    from align.commands.sources import register_ranking_sources
    from align.errors import UserError
    from reward.config import DataSection

    register_ranking_sources()
    for url in ("postgresql+psycopg://u:s3cret@127.0.0.1:1/x", "postgresql+nosuchdriver://u:s3cret@127.0.0.1/x"):
        with pytest.raises(UserError) as info:
            load_reward_data(DataSection(format="annotation", db_url=url, project="rm"))
        assert str(info.value).startswith("data.db_url: ") and "u:***@" in str(info.value), str(info.value)
        assert "s3cret" not in str(info.value)


def test_a_databases_prompt_from_before_the_readers_rules_is_held_to_them_and_still_exports(tmp_path, monkeypatch):
    # a prompt ending with an assistant turn, imported before the readers refused it: a file of it is refused,
    # so training on it straight from the database is too, and the export still writes it (nothing lost)
    import align.chat
    from align.commands.sources import register_ranking_sources
    from align.errors import UserError
    from annotation.db import open_db
    from annotation.services import create_project, export_rankings, get_project, import_rankings
    from reward.config import DataSection

    url = f"sqlite:///{tmp_path / 'ann.db'}"
    make_session = open_db(url)
    older = [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "Sure:"}]
    with monkeypatch.context() as patch, make_session() as db:  # the import as it was: no rule on the turns
        patch.setattr(align.chat, "messages_problem", lambda messages, prompt=True: None)
        import_rankings(db, create_project(db, "rm", k=2), [Ranking(older, ["a", "b"], [0, 1], "ann", "p1")], "kwise")
    with make_session() as db:
        assert [r.prompt for r in export_rankings(db, get_project(db, "rm"))] == [older]
    register_ranking_sources()
    with pytest.raises(UserError, match=r"^data.db_url: project 'rm', prompt 'p1': the prompt ends with an assistant"):
        load_reward_data(DataSection(format="annotation", db_url=url, project="rm"))
