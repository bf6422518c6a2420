"""Readers and writers of preference data (align.formats, align.exports): TRL pairs, HH-RLHF, OpenAssistant
trees, prompts JSONL, kwise."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from align import exports, formats
from align.errors import UserError
from align.files import jsonl_rows
from align.formats import Ranking
from align.run import write_jsonl_atomic


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) and r.startswith("{") else json.dumps(r)) + "\n" for r in rows))
    return path


def test_ordered_pairs_ties_imply_none():
    r = Ranking("p", ["a", "b", "c"], [1, 0, 1])
    assert sorted(r.ordered_pairs()) == [(1, 0), (1, 2)]


def test_trl_plain_conversational_and_implicit(tmp_path):
    user = [{"role": "user", "content": "hi?"}]
    f = write_lines(tmp_path / "trl.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": user + [{"role": "assistant", "content": "hello"}], "rejected": user + [{"role": "assistant", "content": "no"}]},
    ])
    a, b, c = formats.read_trl_pairs(f)
    assert (a.prompt, a.responses, a.ranks) == ("2+2?", ["4", "5"], [0, 1])
    assert (b.prompt, b.responses) == (user, ["hello", "go away"])
    assert (c.prompt, c.responses) == (user, ["hello", "no"])
    assert a.prompt_id != b.prompt_id  # content ids, stable across re-reads
    assert formats.read_trl_pairs(f)[0].prompt_id == a.prompt_id
    # two whole conversations that are the same: the last message is still each one's response
    conversation = user + [{"role": "assistant", "content": "hello"}]
    same = write_lines(tmp_path / "same.jsonl", [{"chosen": conversation, "rejected": conversation}])
    (d,) = formats.read_trl_pairs(same)
    assert (d.prompt, d.responses) == (user, ["hello", "hello"])


def test_trl_errors_name_the_line(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}, {"prompt": "x", "chosen": "a"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*'chosen' and 'rejected'"):
        formats.read_trl_pairs(f)
    g = tmp_path / "broken.jsonl"
    g.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"broken.jsonl:2: not valid JSON"):
        formats.read_trl_pairs(g)
    with pytest.raises(UserError, match="file not found"):
        formats.read_trl_pairs(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_line_with_a_constant_json_does_not_have_is_refused(tmp_path, constant):
    # Python's json reads NaN and Infinity; a file holding them is not JSON, and a stage writing such a
    # row back (align reward score) would write a file other readers refuse
    f = tmp_path / "scores.jsonl"
    f.write_text('{"prompt": "x", "response": "a"}\n{"prompt": "x", "response": "b", "x": ' + constant + "}\n")
    with pytest.raises(UserError, match=rf"^{f}:2: not valid JSON \({constant} is not a JSON value\)$"):
        list(jsonl_rows(f))


def test_a_record_with_a_repeated_key_is_refused_naming_the_key(tmp_path):
    # Python's json keeps the last of two values without a word; which ranking was meant is the user's call
    f = tmp_path / "rankings.jsonl"
    f.write_text('{"prompt": "x", "responses": ["a", "b"], "ranks": [0, 1]}\n'
                 '{"prompt": "y", "responses": ["a", "b"], "ranks": [0, 1], "meta": {"ranks": 1}, "ranks": [1, 0]}\n')
    with pytest.raises(UserError, match=rf"^{f}:2: the key 'ranks' appears twice in one object; keep the one that is meant$"):
        list(jsonl_rows(f))
    f.write_text('{"prompt": "y", "meta": {"a": 1, "a": 2}}\n')  # in a nested object too
    with pytest.raises(UserError, match=rf"^{f}:1: the key 'a' appears twice"):
        list(jsonl_rows(f))


def test_hh_round_trip_and_gzip(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did the chicken...",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."},
    ]
    f = tmp_path / "hh.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write(json.dumps(rows[0]) + "\n")
    (r,) = formats.read_hh(f)
    assert r.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Joke?"}]
    assert r.responses == ["Why did the chicken...", "No."] and r.ranks == [0, 1]
    assert exports.hh_from_rankings([r]) == rows  # byte-exact transcripts back
    out = tmp_path / "out.jsonl"
    write_jsonl_atomic(out, exports.hh_from_rankings([r]))
    assert json.loads(out.read_text()) == rows[0]


def test_hh_transcripts_that_part_at_a_human_turn_keep_the_turns_before_it_as_the_prompt(tmp_path):
    """The prompt ends with a Human turn: transcripts that part at the annotator's next question
    share the first exchange's question, and each response is the rest of its transcript."""
    f = write_lines(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye.\n\nAssistant: Bye!"}])
    (r,) = formats.read_hh(f)
    assert r.prompt == [{"role": "user", "content": "Hi"}]
    assert r.responses == ["Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.", "Hello!\n\nHuman: Bye.\n\nAssistant: Bye!"]


def test_the_hh_export_leaves_out_prompts_it_cannot_hold_and_says_how_many_and_why(tmp_path):
    """A system message read back as a Human turn, and a prompt holding "\\n\\nHuman:" read
    back as more turns: the export changed them without a word. Now they are left out, and
    counted; every row it writes reads back as the ranking it came from."""
    plain = Ranking("Hi?", ["Hello!", "Go away."], [0, 1], prompt_id="ok")
    system = Ranking([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
                     ["Hello!", "No."], [0, 1], prompt_id="sys")
    turns = Ranking("Say\n\nHuman: hi\n\nAssistant: to me", ["hi", "no"], [0, 1], prompt_id="turns")
    rankings = [plain, system, turns]
    rows = exports.hh_from_rankings(rankings)
    out = tmp_path / "hh.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (back,) = formats.read_hh(out)
    assert (back.prompt, back.responses) == ([{"role": "user", "content": "Hi?"}], plain.responses)
    note = exports.hh_left_out(rankings)
    assert note.startswith("2 of 3 rankings left out of the hh export") and "1 with a system message" in note
    assert "1 with" in note.split("system message", 1)[1] and "kwise or pairs" in note
    assert exports.hh_left_out([plain]) is None


def test_oasst_tree_groups_ranked_siblings(tmp_path):
    tree = {"message_tree_id": "t", "prompt": {"message_id": "m0", "role": "prompter", "text": "Q?", "replies": [
        {"message_id": "a1", "role": "assistant", "text": "A1", "rank": 1, "replies": [
            {"message_id": "u2", "role": "prompter", "text": "more?", "replies": [
                {"message_id": "b1", "role": "assistant", "text": "B1", "rank": 0, "replies": []},
                {"message_id": "b2", "role": "assistant", "text": "B2", "rank": 1, "replies": []},
                {"message_id": "b3", "role": "assistant", "text": "B3", "rank": None, "replies": []}]}]},
        {"message_id": "a2", "role": "assistant", "text": "A2", "rank": 0, "replies": []},
        {"message_id": "a3", "role": "assistant", "text": "A3", "rank": None, "replies": []},
    ]}}
    f = write_lines(tmp_path / "t.jsonl", [tree])
    first, second = formats.read_oasst(f)
    assert (first.prompt, first.responses, first.ranks, first.prompt_id) == ([{"role": "user", "content": "Q?"}], ["A1", "A2"], [1, 0], "m0")
    assert second.prompt == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "more?"}]
    assert second.responses == ["B1", "B2"] and second.meta["candidate_ids"] == ["b1", "b2"]  # unranked B3 left out
    with pytest.raises(UserError, match="not an OpenAssistant message tree"):
        formats.read_oasst(write_lines(tmp_path / "x.jsonl", [{"text": "no tree"}]))


def test_prompts_with_and_without_candidates(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [{"prompt": "plain"},
                                          {"prompt": "q", "id": 7, "candidates": ["a", {"text": "b", "model": "m", "sampling": {"t": 1}}]}])
    f.write_text('"a JSON string"\n' + f.read_text())
    a, b, c = formats.read_prompts(f)
    assert (a.prompt, a.candidates) == ("a JSON string", [])
    assert b.prompt == "plain" and c.prompt_id == "7"
    assert [x.text for x in c.candidates] == ["a", "b"] and c.candidates[1].model == "m" and c.candidates[1].sampling == {"t": 1}
    with pytest.raises(UserError, match=r":1: empty prompt"):
        formats.read_prompts(write_lines(tmp_path / "e.jsonl", [{"prompt": "  "}]))


def test_a_line_of_another_format_or_a_misspelt_field_is_not_read_as_a_prompt_without_candidates(tmp_path):
    kwise = {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}
    for row, message in [(kwise, "'responses' is a field of kwise data, not of prompts; import the file as kwise"),
                         ({"prompt": "q", "chosen": "a", "rejected": "b"}, "'chosen' is a field of trl or hh data"),
                         ({"chosen": "a", "rejected": "b"}, "'chosen' is a field of trl or hh data"),
                         ({"prompt": "q", "candidate": ["a", "b"]}, "unknown field 'candidate'; did you mean 'candidates'"),
                         ({"prompt": "q", "promptid": "7"}, "unknown field 'promptid'; did you mean 'prompt_id'")]:
        f = write_lines(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
        with pytest.raises(UserError, match=rf"p.jsonl:2: {re.escape(message)}"):
            formats.read_prompts(f)
    # A source's own metadata is left unread, and a stage reading the prompts alone takes any line with one.
    f = write_lines(tmp_path / "m.jsonl", [{"prompt": "q", "candidates": ["a", "b"], "category": "math", "source": "x"}])
    assert [c.text for c in formats.read_prompts(f)[0].candidates] == ["a", "b"]
    assert formats.read_prompts(write_lines(tmp_path / "k.jsonl", [kwise]), prompts_only=True)[0].prompt == "q"


def test_pairs_writer_plain_and_conversational(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    rankings = [Ranking("p", ["x", "y", "z"], [0, 1, 1], "ann", "id1"), Ranking(chat, ["u", "v"], [1, 0], "ann", "id2")]
    rows = exports.pairs_from_rankings(rankings)
    assert [(r["chosen"], r["rejected"]) for r in rows[:2]] == [("x", "y"), ("x", "z")]
    assert rows[2] == {"prompt": chat, "chosen": [{"role": "assistant", "content": "v"}],
                       "rejected": [{"role": "assistant", "content": "u"}], "prompt_id": "id2", "annotator": "ann"}
    plain = exports.pairs_from_rankings(rankings[1:], conversational=False)
    assert plain[0]["prompt"] == "\n\nHuman: hi\n\nAssistant:" and plain[0]["chosen"] == "v"
    out = tmp_path / "pairs.jsonl"
    write_jsonl_atomic(out, exports.pairs_from_rankings(rankings))
    back = formats.read_trl_pairs(out)  # what we write, TRL readers (and we) read back
    assert [(r.prompt, r.responses) for r in back] == [("p", ["x", "y"]), ("p", ["x", "z"]), (chat, ["v", "u"])]


def test_pair_exports_take_a_repeated_text_once_at_its_best_rank():
    """Two models gave the same answer, ranked apart: the TRL and HH exports hold it once, at its
    best rank, as the training stages read it (no pair of a text with itself, none contradicting
    another); prompt_id and annotator are written only where the ranking knows them."""
    r = Ranking("q", ["a", "b", "a"], [0, 1, 2], prompt_id="p1")
    assert exports.pairs_from_rankings([r]) == [{"prompt": "q", "chosen": "a", "rejected": "b", "prompt_id": "p1"}]
    assert exports.hh_from_rankings([r]) == [{"chosen": "\n\nHuman: q\n\nAssistant: a",
                                              "rejected": "\n\nHuman: q\n\nAssistant: b"}]
    anonymous = Ranking("q", ["a", "b"], [0, 1], annotator="ann")
    assert exports.pairs_from_rankings([anonymous]) == [{"prompt": "q", "chosen": "a", "rejected": "b", "annotator": "ann"}]


def test_kwise_round_trip_keeps_ties_and_meta(tmp_path):
    r = Ranking([{"role": "user", "content": "q"}], ["a", "b", "c"], [0, 0, 1], "ann", "p1", {"all_bad": True, "revision": 2})
    f = tmp_path / "k.jsonl"
    exports.write_kwise([r], f)
    (back,) = formats.read_kwise(f)
    assert back == r
    assert "ranked" not in json.loads(f.read_text())  # a full ranking's line is as before


def test_top_m_ranking_round_trips_with_its_ranked_prefix(tmp_path):
    """A top-2 of 4: the unranked share rank 2; the kwise line carries "ranked": 2, and
    pairs exist only where an order was stated (none between the two unranked)."""
    r = Ranking("q", ["a", "b", "c", "d"], [0, 2, 1, 2], "ann", "p1", {"revision": 1}, ranked=2)
    f = tmp_path / "k.jsonl"
    exports.write_kwise([r], f)
    assert json.loads(f.read_text())["ranked"] == 2
    (back,) = formats.read_kwise(f)
    assert back == r and back.ranked == 2
    assert sorted(r.ordered_pairs()) == [(0, 1), (0, 2), (0, 3), (2, 1), (2, 3)]
    rows = exports.pairs_from_rankings([r])
    assert sorted((p["chosen"], p["rejected"]) for p in rows) == [("a", "b"), ("a", "c"), ("a", "d"), ("c", "b"), ("c", "d")]


@pytest.mark.parametrize("ranks,ranked", [
    ([0, 1, 2, 2], 3),  # three ranked need three ranks below 3
    ([0, 2, 1, 3], 2),  # an unranked response ranks m, not more
    ([0, 1, 1, 1], 0),  # at least one ranked
    ([0, 1, 2, 3], 4),  # m = K is a full ranking: None
    ([0, 1, 2, 2], True),
])
def test_inconsistent_top_m_rankings_are_refused(tmp_path, ranks, ranked):
    with pytest.raises(ValueError):
        Ranking("q", ["a", "b", "c", "d"], ranks, ranked=ranked)
    f = write_lines(tmp_path / "k.jsonl", [{"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": ranks, "ranked": ranked}])
    with pytest.raises(UserError, match="k.jsonl:1"):
        formats.read_kwise(f)


@pytest.mark.parametrize("row, expected", [
    ({"prompt": 42, "responses": ["a", "b"], "ranks": [0, 1]}, "the prompt must be a string or a non-empty list"),
    ({"prompt": [{"role": "user"}], "responses": ["a", "b"], "ranks": [0, 1]}, "string 'role' and 'content'"),
    ({"prompt": "p", "responses": "abc", "ranks": [0, 1, 2]}, "responses must be a list of strings"),
    ({"prompt": "p", "responses": [1, 2], "ranks": [0, 1]}, "responses must be a list of strings"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": ["x", "y"]}, "ranks must be a list of integers >= 0"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [-5, 1.5]}, "ranks must be a list of integers >= 0"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"},  # another format's line: the fields it lacks, in words
     "no 'responses', 'ranks'; a kwise line holds prompt, responses and ranks, this one 'prompt', 'chosen', 'rejected'"),
])
def test_kwise_values_of_the_wrong_kind_are_refused_with_the_line(tmp_path, row, expected):
    path = write_lines(tmp_path / "r.jsonl", [{"prompt": "ok", "responses": ["a", "b"], "ranks": [0, 1]}, row])
    with pytest.raises(UserError, match=rf"^{path}:2: not a kwise ranking line \(.*{expected}"):
        formats.read_kwise(path)


def test_a_byte_order_mark_at_the_start_of_a_file_is_not_read_as_data(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 0]}]
    plain = write_lines(tmp_path / "plain.jsonl", rows)
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    packed = tmp_path / "marked.jsonl.gz"
    packed.write_bytes(gzip.compress(marked.read_bytes()))
    assert formats.read_kwise(marked) == formats.read_kwise(packed) == formats.read_kwise(plain)
    assert formats.read_kwise(marked)[0].prompt == "p"


def test_unreadable_files_are_named_in_one_line(tmp_path):
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "p"}\n\xff\xfe\x00\x81')
    with pytest.raises(UserError, match=rf"^{binary}: not UTF-8 text"):
        formats.read_kwise(binary)
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text("not gzip")
    with pytest.raises(UserError, match=rf"^{fake}: damaged or truncated gzip file"):
        formats.read_kwise(fake)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}\n' * 50)[:-20])
    with pytest.raises(UserError, match=rf"^{cut}: damaged or truncated gzip file"):
        formats.read_kwise(cut)
    with pytest.raises(UserError, match=rf"^{tmp_path} is a directory, not a file$"):
        formats.read_kwise(tmp_path)
    hh, oasst = write_lines(tmp_path / "hh.jsonl", [{"chosen": 5, "rejected": "x"}]), write_lines(
        tmp_path / "oasst.jsonl", [{"prompt": {"text": "q", "role": "prompter", "replies": "nope"}}])
    with pytest.raises(UserError, match=rf"^{hh}:1: not an HH-RLHF row"):
        formats.read_hh(hh)
    with pytest.raises(UserError, match=rf"^{oasst}:1: malformed message tree"):
        formats.read_oasst(oasst)


@pytest.mark.parametrize("row,field", [
    ({"prompt": "x", "candidates": 5}, "'candidates'"),
    ({"prompt": "x", "candidates": "abcd"}, "'candidates'"),
    ({"prompt": "x", "candidates": [{"text": "a", "sampling": 5}]}, "'sampling'"),
    ({"prompt": "x", "candidates": [{"text": "a", "sampling": {"t": float("nan")}}]}, "NaN is not a JSON value"),
    ({"prompt": "x", "candidates": [{"text": "a", "sampling": {"s": "\ud800"}}]}, "lone surrogate"),
])
def test_prompts_of_the_wrong_types_name_file_line_and_field(tmp_path, row, field):
    f = tmp_path / "p.jsonl"
    f.write_text('"fine"\n' + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"p.jsonl:2: .*{field}"):
        formats.read_prompts(f)


def test_kwise_fields_of_the_wrong_types_name_file_line_and_field(tmp_path):
    f = write_lines(tmp_path / "k.jsonl", [{"prompt": "x", "responses": ["a", "b"], "ranks": [0, 1], "candidate_ids": 5}])
    with pytest.raises(UserError, match=r"k.jsonl:1: .*'candidate_ids' must be a list"):
        formats.read_kwise(f)


def test_trl_pairs_sharing_a_prompt_id_are_one_prompt_per_pair_and_keep_their_annotator(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "prompt_id": "q1", "annotator": "ann"},
            {"prompt": "q", "chosen": "b", "rejected": "a", "prompt_id": "q1", "annotator": "bob"},
            {"prompt": "q", "chosen": "a", "rejected": "c", "prompt_id": "q1"},
            {"prompt": "z", "chosen": "a", "rejected": "c", "prompt_id": "z1"}]
    ab, ba, ac, z = formats.read_trl_pairs(write_lines(tmp_path / "t.jsonl", rows))
    assert ab.prompt_id == ba.prompt_id != ac.prompt_id and ab.prompt_id.startswith("q1#")
    assert z.prompt_id == "z1" and (ab.annotator, ba.annotator, ac.annotator) == ("ann", "bob", "trl")


def _oasst_tree(question="Q?", first="A1", second="A2", ranks=(0, 1)):
    return {"prompt": {"message_id": "m0", "role": "prompter", "text": question, "replies": [
        {"message_id": "a1", "role": "assistant", "text": first, "rank": ranks[0], "replies": []},
        {"message_id": "a2", "role": "assistant", "text": second, "rank": ranks[1], "replies": []}]}}


def _read_score_input(path):
    from reward.cli import read_score_input

    return read_score_input(path)


BAD = "hi \ud800"  # valid JSON ("\ud800"), but no UTF-8 text: the tokenizer stopped on it with a TypeError
USER = [{"role": "user", "content": "q"}]
SURROGATES = [
    (formats.read_kwise, {"prompt": BAD, "responses": ["a", "b"], "ranks": [0, 1]}, "'prompt'"),
    (formats.read_kwise, {"prompt": [{"role": "user", "content": BAD}], "responses": ["a", "b"], "ranks": [0, 1]}, "'prompt'"),
    (formats.read_kwise, {"prompt": "q", "responses": ["a", BAD], "ranks": [0, 1]}, "'responses'"),
    (formats.read_kwise, {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1], "annotator": BAD}, "'annotator'"),
    (formats.read_trl_pairs, {"prompt": BAD, "chosen": "a", "rejected": "b"}, "'prompt'"),
    (formats.read_trl_pairs, {"prompt": "q", "chosen": BAD, "rejected": "b"}, "'chosen'"),
    (formats.read_trl_pairs, {"prompt": USER, "chosen": [{"role": "assistant", "content": "a"}],
                              "rejected": [{"role": "assistant", "content": BAD}]}, "'rejected'"),
    (formats.read_hh, {"chosen": f"\n\nHuman: {BAD}\n\nAssistant: a", "rejected": f"\n\nHuman: {BAD}\n\nAssistant: b"},
     "'chosen'"),
    (formats.read_hh, {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": f"\n\nHuman: q\n\nAssistant: {BAD}"},
     "'rejected'"),
    (formats.read_oasst, _oasst_tree(question=BAD), "message 'm0'"),
    (formats.read_oasst, _oasst_tree(second=BAD), "message 'a2'"),
    (formats.read_prompts, {"prompt": BAD}, "the prompt"),
    (formats.read_prompts, {"prompt": "q", "candidates": ["a", BAD]}, "'candidates'"),
    (_read_score_input, {"prompt": [{"role": "user", "content": BAD}], "response": "a"}, "the prompt"),
    (_read_score_input, {"prompt": "q", "response": BAD}, "'response'"),
    (_read_score_input, {"prompt": "q", "response": "a", "id": BAD}, "'id'"),  # written back beside its reward
]


@pytest.mark.parametrize("reader,row,field", SURROGATES)
def test_a_lone_surrogate_in_a_text_a_reader_takes_is_refused_with_file_and_line(tmp_path, reader, row, field):
    """A prompt "hi\\ud800" is valid JSON and read as a str, which the tokenizer refused with a
    traceback in reward train, dpo, reward eval and reward score; every reader now names the
    line, in the words the annotation app's store uses."""
    good = {k: v.replace(BAD, "hi") if isinstance(v, str) else json.loads(json.dumps(v).replace("\\ud800", ""))
            for k, v in row.items()}
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    assert "\\ud800" in f.read_text()
    with pytest.raises(UserError, match=rf"^{f}:2: {field} contains a lone surrogate \(not UTF-8 text\)$"):
        reader(f)
    f.write_text(json.dumps(good) + "\n")
    assert len(reader(f)) == 1


def test_a_nul_in_a_text_is_read_for_training(tmp_path):
    # the annotation app's database refuses it (text_problem); a tokenizer reads it as any character
    f = write_lines(tmp_path / "k.jsonl", [{"prompt": "q\x00", "responses": ["a\x00", "b"], "ranks": [0, 1]}])
    assert formats.read_kwise(f)[0].responses == ["a\x00", "b"]


@pytest.mark.parametrize("ranks", [[0, 2], [0, 10**30], [5, 5]])
def test_a_rank_is_a_place_among_the_k_responses(tmp_path, ranks):
    """Ranks are 0 (best) to K - 1, ties sharing one: a rank of 10**30 was read by the reward
    stage and stopped DPO's collate with an OverflowError (torch.tensor of the ranks)."""
    with pytest.raises(ValueError, match="from 0 .best. to 1"):
        Ranking("q", ["a", "b"], ranks)
    f = write_lines(tmp_path / "k.jsonl", [{"prompt": "ok", "responses": ["a", "b"], "ranks": [0, 1]},
                                          {"prompt": "q", "responses": ["a", "b"], "ranks": ranks}])
    with pytest.raises(UserError, match=rf"^{f}:2: not a kwise ranking line \(ranks must be integers from 0 \(best\) to 1, "):
        formats.read_kwise(f)


@pytest.mark.parametrize("ranks,ranked", [([0, 1, 1], None), ([0, 0, 2], None), ([1, 0, 1], None), ([2, 1, 0], None),
                                          ([0, 0, 0], None), ([0, 2, 1, 2], 2), ([0, 1, 1, 1], 1)])
def test_every_documented_ranking_is_read(tmp_path, ranks, ranked):
    # ties share a rank (dense or competition ranking), and a top-m ranking's unordered rest has rank m
    row = {"prompt": "q", "responses": list("abcd"[:len(ranks)]), "ranks": ranks} | ({"ranked": ranked} if ranked else {})
    (r,) = formats.read_kwise(write_lines(tmp_path / "k.jsonl", [row]))
    assert (r.ranks, r.ranked) == (ranks, ranked)


def test_oasst_ranks_left_with_a_gap_by_a_deleted_sibling_are_read_as_places(tmp_path):
    tree = _oasst_tree(ranks=(2, 0))
    tree["prompt"]["replies"].append({"message_id": "a3", "role": "assistant", "text": "A3", "rank": 1, "deleted": True})
    huge = _oasst_tree(ranks=(10**30, 3))
    (gap,), (big,) = (formats.read_oasst(write_lines(tmp_path / f"{i}.jsonl", [t])) for i, t in enumerate([tree, huge]))
    assert (gap.responses, gap.ranks) == (["A1", "A2"], [1, 0])
    assert big.ranks == [1, 0]
    with pytest.raises(UserError, match="malformed message tree.*>= 0"):
        formats.read_oasst(write_lines(tmp_path / "neg.jsonl", [_oasst_tree(ranks=(-1, 0))]))


@pytest.mark.parametrize("line,kind", [('["hi"]', "a list"), ('["prompt", "responses", "ranks"]', "a list"),
                                       ('["chosen", "rejected"]', "a list"), ("5", "a number"), ("2.5", "a number"),
                                       ('"hi"', "a string"), ("null", "null"), ("true", "true")])
@pytest.mark.parametrize("reader", [formats.read_kwise, formats.read_trl_pairs, formats.read_hh, formats.read_oasst])
def test_a_line_that_is_not_a_json_object_is_named_as_such(tmp_path, reader, line, kind):
    """A kwise line ["hi"] was "not a kwise ranking line (no 'prompt', ...; this one 'hi')", the
    list's items given as its fields; an HH line was "not an HH-RLHF row (list indices must be
    integers...)"."""
    good = {formats.read_kwise: {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]},
            formats.read_trl_pairs: {"prompt": "q", "chosen": "a", "rejected": "b"},
            formats.read_hh: {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            formats.read_oasst: _oasst_tree()}[reader]
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(UserError, match=rf"^{f}:2: expected a JSON object, got {kind}$"):
        reader(f)


ROLE_READERS = [  # (reader, a line holding `prompt`)
    (formats.read_kwise, lambda prompt: {"prompt": prompt, "responses": ["a", "b"], "ranks": [0, 1]}),
    (formats.read_trl_pairs, lambda prompt: {"prompt": prompt, "chosen": [{"role": "assistant", "content": "a"}],
                                             "rejected": [{"role": "assistant", "content": "b"}]}),
    (formats.read_prompts, lambda prompt: {"prompt": prompt}),
]


@pytest.mark.parametrize("reader,line", ROLE_READERS)
@pytest.mark.parametrize("role", ["human", "tool", "User"])
def test_a_message_of_a_role_no_template_renders_alike_is_refused_with_file_line_and_role(tmp_path, reader, line, role):
    # the demo template renders system, user and assistant only: a "human" prompt was read as no text at all
    good = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q?"}]
    f = write_lines(tmp_path / "roles.jsonl", [line(good), line([{"role": role, "content": "How do I bake bread?"}])])
    with pytest.raises(UserError, match=rf"^{f}:2[: ].*message 1 has the role '{role}'; a message's role is system, "
                                        r"user or assistant"):
        reader(f)
    assert len(reader(write_lines(tmp_path / "good.jsonl", [line(good)]))) == 1


@pytest.mark.parametrize("reader,line", ROLE_READERS)
@pytest.mark.parametrize("prompt,last", [
    ([{"role": "user", "content": "q?"}, {"role": "assistant", "content": "Sure:"}], "an assistant"),
    ([{"role": "system", "content": "be brief"}], "a system"),
])
def test_a_prompt_that_does_not_end_with_the_users_turn_is_refused(tmp_path, reader, line, prompt, last):
    # the responses are rendered as a new assistant turn: after an assistant message a second one in a row,
    # after a system message alone an answer to no question
    f = write_lines(tmp_path / "p.jsonl", [line(prompt)])
    with pytest.raises(UserError, match=rf"^{f}:1[: ].*the prompt ends with {last} message, not with the user's turn"):
        reader(f)


@pytest.mark.parametrize("revision", ["1", 0, -1, 1.0, True])
def test_a_revision_that_is_not_a_whole_number_from_1_is_refused_as_the_annotation_import_refuses_it(tmp_path, revision):
    # read as it was, a revision "1" beside a revision 1 of the same prompt was left out as an earlier one
    row = {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "annotator": "ann"}
    f = write_lines(tmp_path / "k.jsonl", [{**row, "revision": 1}, {**row, "prompt": "q", "revision": revision}])
    with pytest.raises(UserError, match=rf"^{f}:2: .*revision must be a whole number from 1, got {re.escape(repr(revision))}"):
        formats.read_kwise(f)
    assert [r.meta["revision"] for r in formats.read_kwise(write_lines(tmp_path / "ok.jsonl", [{**row, "revision": 3}]))] == [3]


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": "p", "responses": ["a", "b"], "ranks": [0, ' + "9" * 5000 + "]}", "a number too long to read"),
    ("[" * 100_000 + "]" * 100_000, "nested too deep to read"),
])
def test_a_line_python_cannot_read_as_json_is_named_like_any_line_that_is_not_json(tmp_path, line, problem):
    f = tmp_path / "k.jsonl"
    f.write_text('{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}\n' + line + "\n")
    for reader in (formats.read_kwise, lambda path: list(jsonl_rows(path))):
        with pytest.raises(UserError, match=rf"^{f}:2: not valid JSON \({problem}\)$"):
            reader(f)


def test_a_file_without_permission_to_read_it_is_one_line(tmp_path, monkeypatch):
    # as root chmod does not stop a read: the open is made to fail as it does for another user
    from pathlib import Path

    from align.files import read_text_file

    f = write_lines(tmp_path / "k.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}])

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(UserError, match=rf"^{f}: cannot be read \(Permission denied\)$"):
        formats.read_kwise(f)
    with pytest.raises(UserError, match=rf"^{f}: cannot be read \(Permission denied\)$"):
        read_text_file(f)
    monkeypatch.undo()
    assert len(formats.read_kwise(f)) == 1
