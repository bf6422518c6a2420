"""bench/annotation_load.py's verdict: every acknowledged ranking checked against the database,
the --timeline file, and the tables of the phases and the checks."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

from bench import annotation_client
from bench.annotation_client import new_stats


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100.0 * (len(values) - 1))))]


def table_rows(args: argparse.Namespace, results: list[tuple[str, dict, float]], window: dict,
               annotators: int) -> list[tuple[str, str, dict, float]]:
    """(phase, row label, stats, seconds) of each row of the table: the import phase's rankings
    started before the import, during it and after it are rows of their own."""
    rows_of_table: list[tuple[str, str, dict, float]] = []
    for kind, st, elapsed in results:
        if kind == "closed":
            rows_of_table.append((kind, "closed loop", st, elapsed))
            continue
        if kind == "overload":
            rows_of_table.append((kind, f"overload: {annotators} annotators in closed loop, each on a "
                                        "connection of its own, Retry-After honoured", st, elapsed))
            continue
        offered = f"open loop, {args.rate:g}/s offered"
        if kind == "import":
            before, during = st.pop("before_import", new_stats()), st.pop("during_import", new_stats())
            took = window.get("end", time.time()) - window.get("start", time.time())
            if args.import_after > 0 or before["scheduled"]:  # (with no lead-in, those started as it was posted)
                rows_of_table.append((kind, f"{offered}, before the import", before, max(args.import_after, 1e-9)))
            rows_of_table.append((kind, f"{offered}, during the import of {args.import_prompts} prompts", during, took))
            rows_of_table.append((kind, f"{offered}, after the import", st,
                                  max(elapsed - took - args.import_after, 1e-9)))
        else:
            rows_of_table.append((kind, offered, st, elapsed))
    return rows_of_table


def report(args: argparse.Namespace, db_url: str, annotators: int, warmup: dict,
           results: list[tuple[str, dict, float]], window: dict, probes: list[tuple[str, int, float]],
           kill_info: dict) -> None:
    """Check the database against what the clients were acknowledged, print the tables and exit
    0 (PASS), 1 (FAIL) or 2 (INCOMPLETE)."""
    from annotation.db import open_db
    from annotation.models import RankingRow

    sm = open_db(db_url)
    with sm() as db:
        rows = {r.id: r for r in db.query(RankingRow).all()}
    sm.kw["bind"].dispose()
    rows_of_table = table_rows(args, results, window, annotators)
    acked = warmup["acked"] + [a for _kind, _label, st, _e in rows_of_table for a in st["acked"]]
    missing = [a for a in acked if a[0] not in rows]
    wrong = [a for a in acked if a[0] in rows and (rows[a[0]].order != a[2] or rows[a[0]].assignment_id != a[1])]
    dup_ack = len(acked) - len({a[0] for a in acked})
    per_pair = Counter((r.prompt_id, r.user_id) for r in rows.values() if r.revision == 1)
    per_prompt = Counter(r.prompt_id for r in rows.values() if r.revision == 1 and not r.skipped)
    over = sum(1 for c in per_prompt.values() if c > args.annotators_per_prompt)

    if args.timeline:
        with open(args.timeline, "w") as f:
            f.write("".join(f"# import {key} {window[key]:.3f}\n" for key in ("start", "end") if key in window))
            f.write("start_s,next_ms,submit_ms,outcome\n")
            f.writelines(f"{t:.3f},{n:.1f},{'' if s is None else f'{s:.1f}'},{o}\n" for t, n, s, o in sorted(annotation_client.TIMELINE))
    print()
    print(f"database: {db_url.split(':')[0].split('+')[0]}; server workers: {args.workers}; {os.cpu_count()} CPU cores; "
          f"load average after: {os.getloadavg()[0]:.1f}; {args.clients} annotators")
    print()
    print("| phase | duration | rankings/s | next p50 / p99 ms | submit p50 / p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, label, st, elapsed in rows_of_table:
        if kind not in ("closed", "overload"):
            label += f" ({st['scheduled']} started, {st['not_started']} not started: server behind)"
        if st["ran_dry"]:
            label += ", cut short: no prompt left"
        print(f"| {label} | {elapsed:.1f} s | {len(st['acked']) / elapsed:.1f} | "
              f"{pct(st['next_ms'], 50):.1f} / {pct(st['next_ms'], 99):.1f} | "
              f"{pct(st['submit_ms'], 50):.1f} / {pct(st['submit_ms'], 99):.1f} | {dict(st['errors']) or 'none'} |")
    print()
    print("| check | value |")
    print("| --- | --- |")
    for label, status, ms in probes:
        print(f"| {label}: refused with | {status} in {ms:.1f} ms (median of 5) |")
    for kind, st, _elapsed in results:
        print(f"| CPU used by other jobs on the machine during the {kind} phase | {st['other_cores']:.2f} cores |")
        if "wal_end" in st:
            print(f"| SQLite WAL file in the {kind} phase: largest (sampled every 0.2 s) / at its end | "
                  f"{st.get('wal_max', 0) / 2**20:.1f} / {st['wal_end'] / 2**20:.1f} MiB |")
        if kind == "overload":
            answers = st["answer_ms"]
            print(f"| overload: requests answered / 503 with Retry-After among them | {len(answers)} / "
                  f"{st['errors']['next 503'] + st['errors']['submit 503']} |")
            print(f"| overload: slowest answer (any status) / p99 | {max(answers, default=float('nan')):.0f} / "
                  f"{pct(answers, 99):.0f} ms |")
    if "start" in window:
        print(f"| import of {args.import_prompts} prompts (K={args.k}) through the API | {window.get('status')}: "
              f"{window.get('added')} added in {window.get('end', float('nan')) - window['start']:.1f} s |")
    if args.kill_at is not None:
        print(f"| kill -9 at / restart took | {args.kill_at:.0f} s / {kill_info.get('restart_s', float('nan')):.1f} s |")
        print(f"| stored but never acknowledged (reply lost in the kill) | {sum(not r.skipped for r in rows.values()) - len(acked)} |")
    print(f"| acknowledged rankings | {len(acked)} |")
    print(f"| acknowledged rankings missing from DB | {len(missing)} |")
    print(f"| acknowledged rankings stored differently | {len(wrong)} |")
    print(f"| duplicated rankings (same annotator+prompt, or id acked twice) | {sum(c - 1 for c in per_pair.values()) + dup_ack} |")
    print(f"| prompts over their annotator count | {over} |")
    ok = not missing and not wrong and not dup_ack and all(c == 1 for c in per_pair.values()) and not over
    dry = (["warm-up"] if warmup["ran_dry"] else []) + list(dict.fromkeys(
        kind for kind, _label, st, _e in rows_of_table if st["ran_dry"]))
    if dry:
        print(f"\nThe prompts ran out in the {', '.join(dry)} phase: its figures cover less than the phase "
              f"it was asked for. Seed more than {args.prompts} with --prompts.")
    verdict = "FAIL" if not ok else "INCOMPLETE" if dry else "PASS"
    print(f"\nRESULT: {verdict} (database at {db_url.split('@')[-1]})")
    sys.exit({"PASS": 0, "FAIL": 1, "INCOMPLETE": 2}[verdict])
