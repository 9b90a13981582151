"""Unit tests of the red team's self-contained HTML report (parsed with the stdlib HTML parser)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.redteam.html import NO_RISK, Rule, Series, line_chart, nice_ticks, render_html

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


@dataclass
class Chart:
    """What one ``<svg>`` holds: its plot box, its series polylines and its rules."""

    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    series: list[dict[str, str]] = field(default_factory=list)
    rules: list[dict[str, str]] = field(default_factory=list)


class Page(HTMLParser):
    """Walk a page, check every non-void element closes in order, and collect what tests need."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.errors: list[str] = []
        self.charts: list[Chart] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._table: str | None = None
        self._in_tbody = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._polyline: dict[str, str] | None = None
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, {k: v or "" for k, v in attrs})
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, {k: v or "" for k, v in attrs})

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag == "table":
            self._table = None
        elif tag == "tbody":
            self._in_tbody = False
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def _element(self, tag: str, attrs: dict[str, str]) -> None:
        self.tags.append(tag)
        css = attrs.get("class", "")
        if tag == "svg":
            self.charts.append(Chart())
        elif tag == "rect" and css == "plot-box":
            self.charts[-1].box = tuple(  # type: ignore[assignment]
                float(attrs[k]) for k in ("x", "y", "width", "height")
            )
        elif tag == "polyline" and css == "series":
            self.charts[-1].series.append(attrs)
        elif tag == "line" and css == "rule":
            self.charts[-1].rules.append(attrs)
        elif tag == "table":
            self._table = css
            self.tables[css] = []
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []


def points(polyline: dict[str, str]) -> list[tuple[float, float]]:
    pairs = [p.split(",") for p in polyline["points"].split()]
    return [(float(x), float(y)) for x, y in pairs]


def inside(chart: Chart, xy: tuple[float, float]) -> bool:
    left, top, width, height = chart.box
    return left - 0.1 <= xy[0] <= left + width + 0.1 and top - 0.1 <= xy[1] <= top + height + 0.1


def attack(name: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "attack": name,
        "identities": 1,
        "sent": 2000,
        "answered": 2000,
        "first_refusal": None,
        "work_s": 0.0,
        "challenges": 0,
        "statuses": {"200": 63},
        "fidelity_softmax": 0.93,
        "accuracy_softmax": 0.91,
        "fidelity_mlp": 0.95,
        "accuracy_mlp": 0.92,
        "fidelity": 0.95,
        "watermark": {"verdict": "stolen", "p_value": 1e-9, "checked": 400},
        "curve": [
            {"sent": 250, "answered": 250, "fidelity": 0.81},
            {"sent": 2000, "answered": 2000, "fidelity": 0.95},
        ],
        "risk": [],
    }
    base.update(fields)
    return base


def document() -> dict[str, Any]:
    """Return a two-run report: knockoff only undefended, uniform in both, benign only undefended."""
    return {
        "version": 2,
        "started": "2026-11-28T13:20:00Z",
        "seed": 0,
        "budget": 2000,
        "batch": 32,
        "dialect": "kserve_v1",
        "thresholds": {"elevated": 0.3, "suspicious": 0.6, "abusive": 0.9},
        "runs": [
            {
                "label": "undefended",
                "target": "http://127.0.0.1:8081/v1/models/digits:predict",
                "attacks": [attack("knockoff"), attack("uniform", fidelity=0.5)],
                "benign": {
                    "clients": 5,
                    "queries": 2000,
                    "refusals": 0,
                    "challenges": 0,
                    "top1_changes": 0.004,
                    "statuses": {"200": 70},
                    "risk": [
                        {"client": "benign-0", "sent": 100, "score": 0.02, "level": "normal"},
                        {"client": "benign-0", "sent": 200, "score": 0.03, "level": "normal"},
                        {"client": "benign-1", "sent": 100, "score": 0.05, "level": "normal"},
                    ],
                },
            },
            {
                "label": "defended",
                "target": "http://127.0.0.1:8080/v1/models/digits:predict",
                "attacks": [
                    attack(
                        "uniform",
                        answered=96,
                        first_refusal=96,
                        work_s=3.2,
                        fidelity=0.22,
                        watermark=None,
                        curve=[{"sent": 96, "answered": 96, "fidelity": 0.22}],
                        risk=[
                            {"sent": 32, "score": 0.1, "level": "normal"},
                            {"sent": 64, "score": 0.7, "level": "suspicious"},
                        ],
                    )
                ],
                "benign": None,
            },
        ],
    }


def parse(doc: dict[str, Any]) -> Page:
    page = Page(render_html(doc))
    assert page.errors == []
    return page


class TestPage:
    """The page is balanced HTML that needs nothing from the network."""

    def test_every_element_closes_in_order(self) -> None:
        page = parse(document())
        assert page.tags.count("svg") == 3  # fidelity, and risk for each run with samples
        assert "table" in page.tags

    def test_the_page_is_self_contained(self) -> None:
        text = render_html(document())
        page = parse(document())
        assert text.startswith("<!DOCTYPE html>")
        assert "style" in page.tags
        assert not {"script", "link", "img", "iframe"} & set(page.tags)
        assert "url(" not in text and "@import" not in text

    def test_header_says_when_and_against_what(self) -> None:
        text = "".join(parse(document()).text)
        assert "2026-11-28T13:20:00Z" in text
        assert "http://127.0.0.1:8080/v1/models/digits:predict" in text
        assert "kserve_v1" in text


class TestEscaping:
    """Names and URLs from the document never become markup."""

    def test_script_names_and_hostile_urls_stay_text(self) -> None:
        doc = document()
        evil = "<script>alert(1)</script>"
        doc["runs"][1]["attacks"][0]["attack"] = evil
        doc["runs"][1]["attacks"][0]["risk"][0]["client"] = '"><img src=x onerror=alert(2)>'
        doc["runs"][0]["label"] = "<b>undefended</b>"
        doc["runs"][0]["target"] = 'http://x/"><iframe src=//evil>'
        text = render_html(doc)
        page = parse(doc)
        assert not {"script", "img", "iframe", "b"} & set(page.tags)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        seen = "".join(page.text)
        assert evil in seen  # shown to the operator as text
        assert 'http://x/"><iframe src=//evil>' in seen


class TestAttackTable:
    """One row per attack across runs, a column group per run, "–" where a value is missing."""

    def test_one_row_per_attack_in_order_of_first_appearance(self) -> None:
        rows = parse(document()).tables["attacks"]
        assert [row[0] for row in rows] == ["knockoff", "uniform"]
        assert all(len(row) == 1 + 2 * 7 for row in rows)

    def test_an_attack_missing_from_a_run_gets_dashes(self) -> None:
        knockoff = parse(document()).tables["attacks"][0]
        assert knockoff[1:3] == ["2000", "2000"]
        assert knockoff[8:] == ["–"] * 7

    def test_cells_show_refusal_work_fidelity_and_watermark(self) -> None:
        uniform = parse(document()).tables["attacks"][1]
        undefended, defended = uniform[1:8], uniform[8:]
        assert undefended[2] == "–"  # no refusal
        assert undefended[4] == "0.500"
        assert undefended[6].startswith("stolen") and "p=1e-09" in undefended[6]
        assert defended[:5] == ["2000", "96", "96", "3.20", "0.220"]
        assert defended[5] == "0.920"  # accuracy of the best (mlp) clone
        assert defended[6] == "–"  # watermark not checked

    def test_best_clone_is_derived_when_fidelity_is_null(self) -> None:
        doc = document()
        doc["runs"] = doc["runs"][:1]
        doc["runs"][0]["attacks"] = [
            attack("k", fidelity=None, fidelity_softmax=0.7, accuracy_softmax=0.6)
            | {"fidelity_mlp": 0.4, "accuracy_mlp": 0.9}
        ]
        row = parse(doc).tables["attacks"][0]
        assert row[5:7] == ["0.700", "0.600"]

    def test_sybil_runs_get_their_own_row(self) -> None:
        doc = document()
        doc["runs"][1]["attacks"].append(attack("knockoff", identities=4))
        names = [row[0] for row in parse(doc).tables["attacks"]]
        assert names == ["knockoff", "uniform", "knockoff (K=4)"]


class TestBenignTable:
    """Each run gets a benign row; a run without a benign workload says so."""

    def test_counts_and_share(self) -> None:
        rows = parse(document()).tables["benign"]
        assert rows[0] == ["undefended", "5", "2000", "0", "0", "0.40\u2009%"]
        assert rows[1][0] == "defended" and rows[1][1].startswith("–")


class TestFidelityPlot:
    """One line per (attack, run) with a curve, inside the plot box, later runs dashed."""

    def test_one_polyline_per_series_inside_the_box(self) -> None:
        chart = parse(document()).charts[0]
        assert len(chart.series) == 3  # knockoff, uniform (undefended), uniform (defended)
        for line in chart.series:
            assert all(inside(chart, xy) for xy in points(line))

    def test_defended_runs_are_dashed_and_colours_follow_the_attack(self) -> None:
        knockoff, uniform, uniform_defended = parse(document()).charts[0].series
        assert "stroke-dasharray" not in knockoff and "stroke-dasharray" not in uniform
        assert uniform_defended["stroke-dasharray"]
        assert uniform["stroke"] == uniform_defended["stroke"] != knockoff["stroke"]

    def test_points_map_onto_the_axes(self) -> None:
        chart = parse(document()).charts[0]
        left, top, width, height = chart.box
        (x1, y1), (x2, y2) = points(chart.series[0])  # fidelity 0.81 at 250, 0.95 at 2000
        assert x2 == pytest.approx(left + width)  # 2000 is the last nice tick
        assert y2 < y1  # higher fidelity sits higher
        assert y2 == pytest.approx(top + height * (1 - 0.95), abs=0.1)

    def test_null_fidelities_and_empty_curves_leave_a_placeholder(self) -> None:
        doc = document()
        for run in doc["runs"]:
            for a in run["attacks"]:
                a["curve"] = [{"sent": 10, "answered": None, "fidelity": None}]
        doc["runs"][0]["attacks"][0]["curve"] = []
        page = parse(doc)
        assert "no fidelity samples" in "".join(page.text)
        assert len(page.charts) == 2  # only the risk plots are left


class TestRiskPlot:
    """Risk lines per attack and benign client, with the level thresholds as rules."""

    def test_lines_per_attack_and_per_benign_client(self) -> None:
        page = parse(document())
        assert len(page.charts) == 3  # fidelity, then risk of each run with samples
        undefended, defended = page.charts[1:]
        assert len(undefended.series) == 2  # benign-0, benign-1
        assert len(defended.series) == 1  # uniform
        assert all(line["stroke-dasharray"] for line in undefended.series)  # benign dotted
        for chart in page.charts[1:]:
            for line in chart.series:
                assert all(inside(chart, xy) for xy in points(line))

    def test_samples_with_clients_split_into_lines(self) -> None:
        doc = document()
        doc["runs"][1]["attacks"][0]["risk"] = [
            {"client": "k1", "sent": 32, "score": 0.1},
            {"client": "k2", "sent": 32, "score": 0.2},
            {"client": "k1", "sent": 64, "score": 0.4},
        ]
        (k1, k2) = parse(doc).charts[2].series
        assert len(points(k1)) == 2 and len(points(k2)) == 1

    def test_threshold_rules_are_drawn_in_order(self) -> None:
        chart = parse(document()).charts[2]
        ys = [float(rule["y1"]) for rule in chart.rules]
        assert len(ys) == 3
        assert ys == sorted(ys, reverse=True)  # elevated lowest on screen, abusive highest
        _, top, _, height = chart.box
        assert ys[1] == pytest.approx(top + height * (1 - 0.6), abs=0.1)

    def test_no_thresholds_no_rules(self) -> None:
        doc = document()
        doc["thresholds"] = None
        assert all(chart.rules == [] for chart in parse(doc).charts)

    def test_no_risk_samples_leave_the_admin_hint(self) -> None:
        doc = document()
        doc["runs"][0]["benign"]["risk"] = []
        doc["runs"][1]["attacks"][0]["risk"] = None
        page = parse(doc)
        assert NO_RISK in "".join(page.text)
        assert len(page.charts) == 1


class TestDegenerateDocuments:
    """Empty, partial or odd documents render without raising."""

    @pytest.mark.parametrize(
        "doc",
        [
            {},
            {"runs": []},
            {"runs": None, "thresholds": "high"},
            {"runs": [{}]},
            {"runs": [{"label": None, "attacks": None, "benign": None}]},
            {"runs": [{"attacks": [{"attack": None, "curve": [{"sent": 5, "fidelity": 0.5}]}]}]},
            {"runs": ["not a run", {"attacks": ["not an attack"]}]},
        ],
    )
    def test_renders(self, doc: dict[str, Any]) -> None:
        page = parse(doc)
        assert "html" in page.tags

    def test_empty_runs_show_placeholders(self) -> None:
        text = "".join(parse({"version": 2, "runs": []}).text)
        assert "no runs in this report" in text
        assert NO_RISK in text
        assert "no fidelity samples" in text

    def test_a_single_run_report(self) -> None:
        doc = document()
        doc["runs"] = doc["runs"][1:]
        page = parse(doc)
        rows = page.tables["attacks"]
        assert [row[0] for row in rows] == ["uniform"]
        assert len(rows[0]) == 1 + 7
        assert len(page.charts[0].series) == 1
        assert "stroke-dasharray" not in page.charts[0].series[0]  # the only run is solid

    def test_a_single_point_at_zero_draws_inside_the_box(self) -> None:
        doc = document()
        doc["runs"] = doc["runs"][1:]
        doc["runs"][0]["attacks"][0]["curve"] = [{"sent": 0, "answered": 0, "fidelity": 0.0}]
        chart = parse(doc).charts[0]
        (xy,) = points(chart.series[0])
        assert inside(chart, xy)

    def test_the_input_is_not_modified(self) -> None:
        doc = document()
        before = copy.deepcopy(doc)
        render_html(doc)
        assert doc == before

    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**12), 10**12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.lists(st.none(), max_size=1),
    )
    keys = st.sampled_from(
        ["attack", "identities", "sent", "answered", "first_refusal", "work_s", "fidelity"]
        + ["fidelity_mlp", "accuracy_mlp", "watermark", "curve", "risk", "client", "score"]
    )
    point = st.dictionaries(
        st.sampled_from(["sent", "answered", "fidelity", "score", "client"]), values
    )
    attacks = st.dictionaries(keys, values) | st.builds(
        lambda name, curve, risk: {"attack": name, "curve": curve, "risk": risk},
        st.text(max_size=8),
        st.lists(point, max_size=4),
        st.lists(point, max_size=4),
    )

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.lists(attacks, max_size=3), max_size=3), st.dictionaries(keys, values))
    def test_fuzzed_documents_stay_balanced(
        self, runs: list[list[dict[str, Any]]], thresholds: dict[str, Any]
    ) -> None:
        doc = {"runs": [{"attacks": a} for a in runs], "thresholds": thresholds}
        parse(doc)


class TestLineChart:
    """The chart helper draws any series, including degenerate ones, inside its box."""

    def test_nice_ticks_cover_the_range_with_round_steps(self) -> None:
        assert nice_ticks(0.0, 2000.0) == (0.0, 500.0, 1000.0, 1500.0, 2000.0)
        ticks = nice_ticks(0.0, 1.0)
        assert ticks[0] == 0.0 and ticks[-1] == pytest.approx(1.0) and len(ticks) == 6
        ticks = nice_ticks(13.0, 97.0)
        assert ticks[0] <= 13.0 and ticks[-1] >= 97.0 and ticks[1] - ticks[0] == 20.0

    @pytest.mark.parametrize(
        ("lo", "hi"), [(0.0, 0.0), (5.0, 5.0), (-3.0, -3.0), (math.nan, 1.0), (2.0, 1.0)]
    )
    def test_nice_ticks_widen_degenerate_ranges(self, lo: float, hi: float) -> None:
        ticks = nice_ticks(lo, hi)
        assert len(ticks) >= 2 and ticks[-1] > ticks[0]
        if math.isfinite(lo):
            assert ticks[0] <= min(lo, hi) and ticks[-1] >= max(lo, hi)

    def test_zero_width_x_and_a_rule_above_one(self) -> None:
        svg = line_chart(
            [Series("a", ((7.0, 0.5), (7.0, 0.6)), "#000"), Series("empty", (), "#111")],
            title="t",
            x_label="x",
            y_label="y",
            x_from_zero=False,
            rules=[Rule("high", 1.5, "#f00")],
        )
        page = Page(svg)
        assert page.errors == []
        (chart,) = page.charts
        assert len(chart.series) == 1  # the empty series is not drawn
        assert all(inside(chart, xy) for xy in points(chart.series[0]))
        assert inside(chart, (float(chart.rules[0]["x1"]), float(chart.rules[0]["y1"])))

    def test_no_series_still_draws_axes(self) -> None:
        page = Page(line_chart([], title="t", x_label="x", y_label="y"))
        assert page.errors == [] and page.charts[0].box[2] > 0
