"""Real OpenAssistant and HH-RLHF data through import -> database -> export."""

from __future__ import annotations

import json

import pytest

from align.formats import read_kwise, read_oasst

pytestmark = pytest.mark.realdata


def test_oasst_import_export_matches_source(shared_data, tmp_path, capsys):
    from align.commands.cli import main

    src = shared_data / "oasst" / "en_100_tree.jsonl"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    db = f"sqlite:///{tmp_path / 'oasst.db'}"

    def cli(*argv):
        try:
            main(list(argv))
        except SystemExit as exc:
            assert exc.code in (0, None)

    cli("annotate", "import", str(src), "--db", db, "-p", "oasst", "-f", "oasst")
    cli("annotate", "export", "--db", db, "-p", "oasst", "-f", "kwise", "-o", str(tmp_path / "k.jsonl"))
    cli("annotate", "export", "--db", db, "-p", "oasst", "-f", "trl", "-o", str(tmp_path / "p.jsonl"))
    source = {r.prompt_id: r for r in read_oasst(src)}
    exported = read_kwise(tmp_path / "k.jsonl")
    assert len(source) == 212 and len(exported) == 212
    for r in exported:
        s = source[r.prompt_id]
        assert (r.prompt, r.responses, r.ranks) == (s.prompt, s.responses, s.ranks)
        assert r.meta["candidate_ids"] == s.meta["candidate_ids"]
    pairs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(pairs) == 754
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"][0]["role"] == "assistant" for p in pairs)


def test_hh_import_export_round_trip(shared_data, tmp_path):
    import gzip

    from annotation import services
    from annotation.db import open_db

    src = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    with open_db(f"sqlite:///{tmp_path / 'hh.db'}")() as db:
        report = services.import_file(db, "hh", "hh", src)
        rows = services.export_rows(db, services.get_project(db, "hh"), "hh")
    original = [json.loads(line) for line in gzip.open(src, "rt", encoding="utf-8")]
    unique = {(o["chosen"], o["rejected"]) for o in original}
    assert report.rankings_added == len(unique) and report.duplicates_skipped == len(original) - len(unique)
    assert {(r["chosen"], r["rejected"]) for r in rows} == unique  # transcripts back byte for byte
