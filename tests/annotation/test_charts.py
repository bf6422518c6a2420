"""The dashboard's SVG charts: time labels that tell the ends of a run apart, and labels whose
size does not shrink with the chart (a phone draws it about 340 px wide)."""

from __future__ import annotations

import re
import time

import pytest

from annotation import charts
from annotation.services.reports import timeline

T0 = 1_795_935_200.0  # 2026-11-29 06:53:20 UTC


@pytest.fixture(autouse=True)
def _utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_time_labels_carry_the_date_and_never_read_the_same():
    assert charts.time_labels(T0, T0 + 3 * 86400 + 60) == ("2026-11-29 06:53", "2026-12-02 06:54 UTC")
    assert charts.time_labels(T0, T0 + 86400) == ("2026-11-29 06:53", "2026-11-30 06:53 UTC")  # a day: both dates
    assert charts.time_labels(T0, T0 + 3600) == ("2026-11-29 06:53", "07:53 UTC")  # one day: the date once
    assert charts.time_labels(T0, T0 + 20) == ("2026-11-29 06:53:20", "06:53:40 UTC")  # one minute: seconds
    assert charts.time_labels(T0 + 17 * 3600, T0 + 18 * 3600) == ("2026-11-29 23:53", "2026-11-30 00:53 UTC")


def _font_sizes(svg: str) -> list[float]:
    return [float(s) for s in re.findall(r'font-size="([\d.]+)"', svg)]


def test_progress_line_over_days_is_labelled_with_dates_in_pixels():
    svg = str(charts.progress_line(timeline([T0, T0 + 3600, T0 + 2 * 86400]), 10))
    outer = svg[: svg.index(">")]
    assert "viewBox" not in outer  # user units are CSS px: the labels keep their size on a phone
    assert min(_font_sizes(svg)) >= 12
    assert ">2026-11-29 06:53<" in svg and ">2026-12-01 06:53 UTC<" in svg
    assert ">target 10<" in svg and ">3<" in svg  # the target's line and the count at the line's end
    assert svg.count("<path") == 1 and 'preserveAspectRatio="none"' in svg


def test_agreement_bars_sort_the_outlier_first_with_labels_in_pixels():
    annotators = [{"username": "ann1", "tau_vs_others": 0.5, "shared_items": 2},
                  {"username": "ann3", "tau_vs_others": -1.0, "shared_items": 2},
                  {"username": "new", "tau_vs_others": None, "shared_items": 0}]
    svg = str(charts.agreement_bars(annotators))
    assert "viewBox" not in svg and min(_font_sizes(svg)) >= 12
    names = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert names[0] == "ann3" and "new" not in names  # no figure, no bar
    assert svg.count("<rect") == 2 and 'x="0.00%" y="22" width="50.00%"' in svg  # -1: the whole left half
