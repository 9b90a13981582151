"""Render the red team's JSON report (version 2) as one self-contained HTML page for operators.

The page carries its own CSS and inline SVG plots drawn here (no scripts, fonts or network), so
it can be mailed, attached to a ticket or opened from a CI artifact as is. Every value taken
from the document is HTML-escaped: attack names, labels and target URLs come from user input.

Sections: when and against what the red team ran; a side-by-side table of the attacks per run;
the benign workload per run; fidelity of the best clone against the instances it was trained
on; and each client's risk score over the instances it sent, with the level thresholds.

:func:`line_chart` is the one plot helper: series of (x, y) points on linear axes with nice
ticks, a legend and optional horizontal rules. Any field of the document may be null or
missing; the page then shows "–" or a placeholder instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any, Final

import numpy as np

__all__ = ["NO_RISK", "Rule", "Series", "line_chart", "nice_ticks", "render_html"]

MISSING: Final = "–"
NO_RISK: Final = "no risk samples (pass --admin to record them)"
NO_CURVE: Final = "no fidelity samples (no attack got answers to train a clone on)"
NO_RUNS: Final = "no runs in this report"

#: Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE: Final = (
    "#0072b2",
    "#d55e00",
    "#009e73",
    "#cc79a7",
    "#e69f00",
    "#56b4e9",
    "#000000",
    "#f0e442",
)
#: stroke-dasharray per run: the first run solid, later (defended) runs dashed.
RUN_DASHES: Final = ("", "7 4", "2 3", "10 3 2 3")
BENIGN_COLOR: Final = "#8a8a8a"
BENIGN_DASH: Final = "2 3"
#: Risk levels drawn as rules, lowest first, with their colours.
LEVELS: Final = (("elevated", "#c9a800"), ("suspicious", "#e06c00"), ("abusive", "#b0102a"))

# Chart geometry in SVG user units.
_PLOT_W: Final = 600.0
_PLOT_H: Final = 300.0
_LEFT: Final = 64.0
_TOP: Final = 16.0
_BOTTOM: Final = 48.0
_LEGEND_GAP: Final = 24.0
_LEGEND_W: Final = 300.0
_LEGEND_ROW: Final = 18.0
_LEGEND_CHARS: Final = 40


@dataclass(frozen=True, slots=True)
class Series:
    """One line of a chart: its legend label, its (x, y) points and its stroke."""

    label: str
    points: tuple[tuple[float, float], ...]
    color: str
    dash: str = ""
    """SVG ``stroke-dasharray``; empty for a solid line."""


@dataclass(frozen=True, slots=True)
class Rule:
    """A horizontal reference line across a chart, such as a risk-level threshold."""

    label: str
    y: float
    color: str


# --- reading the document defensively ------------------------------------------------------


def _num(value: object) -> float | None:
    """Return ``value`` as a finite float, or None when it is null, not a number, or not finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _maps(value: object) -> list[Mapping[str, Any]]:
    """Return the mappings in a list value, dropping anything else (a non-list gives [])."""
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _text(value: object) -> str:
    """Return ``value`` escaped for HTML, or "–" when it is null or empty."""
    if value is None or value == "":
        return MISSING
    return escape(str(value))


def _count(value: object) -> str:
    number = _num(value)
    if number is None:
        return MISSING
    return str(int(number)) if number.is_integer() else f"{number:.1f}"


def _fixed(value: object, digits: int) -> str:
    number = _num(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def _share(value: object) -> str:
    number = _num(value)
    return MISSING if number is None else f"{100.0 * number:.2f}\u2009%"


def _run_label(run: Mapping[str, Any], index: int) -> str:
    label = run.get("label")
    return str(label) if label not in (None, "") else f"run {index + 1}"


def _attack_key(attack: Mapping[str, Any]) -> str:
    """Return the row name of an attack: its name, and its identity count when it is a Sybil."""
    name = str(attack.get("attack") or "?")
    identities = _num(attack.get("identities"))
    if identities is not None and identities > 1:
        return f"{name} (K={int(identities)})"
    return name


def _best_clone(attack: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Return (fidelity, accuracy) of the best clone: the one with the highest fidelity."""
    kinds = sorted({k.split("_", 1)[1] for k in attack if k.startswith(("fidelity_", "accuracy_"))})
    scored = [
        (_num(attack.get(f"fidelity_{kind}")), _num(attack.get(f"accuracy_{kind}")))
        for kind in kinds
    ]
    fidelity = _num(attack.get("fidelity"))
    accuracy = _num(attack.get("accuracy"))
    with_fid = [(f, a) for f, a in scored if f is not None]
    if with_fid:
        best_fid, best_acc = max(with_fid, key=lambda pair: pair[0])
        fidelity = best_fid if fidelity is None else fidelity
        accuracy = best_acc if accuracy is None else accuracy
    if accuracy is None:
        accs = [a for _, a in scored if a is not None]
        accuracy = max(accs) if accs else None
    return fidelity, accuracy


# --- charts ---------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 5) -> tuple[float, ...]:
    """Return about ``count`` round tick values (steps of 1, 2 or 5 × 10^k) covering [lo, hi].

    The first tick is at or below ``lo`` and the last at or above ``hi``, so the ticks can be
    the axis ends. A zero-width or non-finite range is widened rather than refused.
    """
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(hi - lo)):
        lo, hi = 0.0, 1.0  # also a span too wide for floats (1e308 - -1e308)
    lo, hi = min(lo, hi), max(lo, hi)
    if hi - lo <= 0.0 or not math.isfinite(hi - lo):
        pad = abs(lo) / 2.0 if lo != 0.0 and math.isfinite(abs(lo) / 2.0) else 1.0
        lo, hi = (lo - pad, hi + pad) if lo != 0.0 else (0.0, 1.0)
    raw = (hi - lo) / max(count, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw * 0.999999)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return tuple(float(k * step) + 0.0 for k in range(first, last + 1))


def _tick_text(value: float, ticks: Sequence[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    finite = math.isfinite(step) and step > 0
    digits = max(0, -math.floor(math.log10(step) + 1e-9)) if finite else 0
    return f"{value + 0.0:.{digits}f}"


_ABSURD = 1e15


def _clean(points: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Drop non-finite and absurd points and sort the rest by x so a line never doubles back.

    No red-team figure comes near 1e15; beyond it, axis arithmetic would overflow.
    """
    kept = [(x, y) for x, y in points if abs(x) < _ABSURD and abs(y) < _ABSURD]
    return tuple(sorted(kept, key=lambda p: p[0]))


def _svg_num(value: float) -> str:
    return f"{value:.1f}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_domain: tuple[float, float] = (0.0, 1.0),
    x_from_zero: bool = True,
    rules: Sequence[Rule] = (),
) -> str:
    """Return an inline SVG line chart of ``series`` with axes, nice ticks, rules and a legend.

    The y axis spans at least ``y_domain`` and the x axis starts at zero when ``x_from_zero``;
    both widen to hold every point and rule. Series without finite points are left out. Each
    drawn series is one ``<polyline class="series">`` plus a dot per point, so a single point
    still shows.
    """
    drawn = [(s, pts) for s in series if (pts := _clean(s.points))]
    rules = [r for r in rules if math.isfinite(r.y)]
    xs = np.array([x for _, pts in drawn for x, _ in pts], dtype=np.float64)
    ys = np.array([y for _, pts in drawn for _, y in pts] + [r.y for r in rules], dtype=np.float64)
    x_lo = float(xs.min()) if xs.size else 0.0
    x_hi = float(xs.max()) if xs.size else 1.0
    if x_from_zero:
        x_lo, x_hi = min(0.0, x_lo), max(0.0, x_hi)
    y_lo = min(y_domain[0], float(ys.min())) if ys.size else y_domain[0]
    y_hi = max(y_domain[1], float(ys.max())) if ys.size else y_domain[1]
    x_ticks = nice_ticks(x_lo, x_hi)
    y_ticks = nice_ticks(y_lo, y_hi)
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]

    def px(x: np.ndarray) -> np.ndarray:
        return _LEFT + (x - x0) / (x1 - x0) * _PLOT_W

    def py(y: np.ndarray) -> np.ndarray:
        return _TOP + _PLOT_H - (y - y0) / (y1 - y0) * _PLOT_H

    legend_x = _LEFT + _PLOT_W + _LEGEND_GAP
    width = legend_x + _LEGEND_W
    legend_h = _TOP + _LEGEND_ROW * (len(drawn) + len(rules) + 1)
    height = max(_TOP + _PLOT_H + _BOTTOM, legend_h)
    bottom = _TOP + _PLOT_H
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {_svg_num(width)} '
        f'{_svg_num(height)}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect class="plot-box" x="{_svg_num(_LEFT)}" y="{_svg_num(_TOP)}" '
        f'width="{_svg_num(_PLOT_W)}" height="{_svg_num(_PLOT_H)}"/>',
    ]
    for value, x in zip(x_ticks, px(np.array(x_ticks)), strict=True):
        out.append(
            f'<line class="grid" x1="{_svg_num(x)}" y1="{_svg_num(_TOP)}" x2="{_svg_num(x)}" '
            f'y2="{_svg_num(bottom)}"/><text class="tick" x="{_svg_num(x)}" '
            f'y="{_svg_num(bottom + 16)}" text-anchor="middle">{_tick_text(value, x_ticks)}</text>'
        )
    for value, y in zip(y_ticks, py(np.array(y_ticks)), strict=True):
        out.append(
            f'<line class="grid" x1="{_svg_num(_LEFT)}" y1="{_svg_num(y)}" '
            f'x2="{_svg_num(_LEFT + _PLOT_W)}" y2="{_svg_num(y)}"/><text class="tick" '
            f'x="{_svg_num(_LEFT - 6)}" y="{_svg_num(y + 4)}" text-anchor="end">'
            f"{_tick_text(value, y_ticks)}</text>"
        )
    out.append(
        f'<text class="axis-label" x="{_svg_num(_LEFT + _PLOT_W / 2)}" '
        f'y="{_svg_num(bottom + 38)}" text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="axis-label" x="16" y="{_svg_num(_TOP + _PLOT_H / 2)}" text-anchor="middle" '
        f'transform="rotate(-90 16 {_svg_num(_TOP + _PLOT_H / 2)})">{escape(y_label)}</text>'
    )
    for rule in rules:
        y = _svg_num(float(py(np.array(rule.y))))
        out.append(
            f'<line class="rule" x1="{_svg_num(_LEFT)}" y1="{y}" x2="{_svg_num(_LEFT + _PLOT_W)}" '
            f'y2="{y}" stroke="{escape(rule.color)}" stroke-dasharray="5 4">'
            f"<title>{escape(rule.label)}</title></line>"
        )
    for s, pts in drawn:
        arr = np.array(pts, dtype=np.float64)
        cx, cy = px(arr[:, 0]), py(arr[:, 1])
        coords = " ".join(f"{_svg_num(a)},{_svg_num(b)}" for a, b in zip(cx, cy, strict=True))
        dash = f' stroke-dasharray="{escape(s.dash)}"' if s.dash else ""
        out.append(
            f'<polyline class="series" points="{coords}" stroke="{escape(s.color)}"{dash}>'
            f"<title>{escape(s.label)}</title></polyline>"
        )
        out.extend(
            f'<circle class="dot" cx="{_svg_num(a)}" cy="{_svg_num(b)}" r="2.5" '
            f'fill="{escape(s.color)}"/>'
            for a, b in zip(cx, cy, strict=True)
        )
    entries = [(s.label, s.color, s.dash) for s, _ in drawn]
    entries += [(f"{r.label} ({r.y:g})", r.color, "5 4") for r in rules]
    for row, (label, color, dash) in enumerate(entries):
        y = _TOP + _LEGEND_ROW * (row + 0.5)
        short = label if len(label) <= _LEGEND_CHARS else label[: _LEGEND_CHARS - 1] + "…"
        dash_attr = f' stroke-dasharray="{escape(dash)}"' if dash else ""
        out.append(
            f'<g class="legend"><line x1="{_svg_num(legend_x)}" y1="{_svg_num(y)}" '
            f'x2="{_svg_num(legend_x + 28)}" y2="{_svg_num(y)}" stroke="{escape(color)}"'
            f'{dash_attr}/><text x="{_svg_num(legend_x + 34)}" y="{_svg_num(y + 4)}">'
            f"<title>{escape(label)}</title>{escape(short)}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out)


# --- page sections --------------------------------------------------------------------------


def _color_of(keys: Sequence[str]) -> dict[str, str]:
    return {key: PALETTE[i % len(PALETTE)] for i, key in enumerate(keys)}


def _attack_rows(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return the attack row names in the order they first appear across runs."""
    seen: dict[str, None] = {}
    for run in runs:
        for attack in _maps(run.get("attacks")):
            seen.setdefault(_attack_key(attack))
    return list(seen)


def _watermark_cell(value: object) -> str:
    mark = _map(value)
    verdict = mark.get("verdict")
    if verdict is None:
        return f"<td>{MISSING}</td>"
    css = {"stolen": "stolen", "not shown": "clean"}.get(str(verdict), "")
    cell = f'<span class="{css}">{_text(verdict)}</span>' if css else _text(verdict)
    p_value = _num(mark.get("p_value"))
    if p_value is not None:
        cell += f' <span class="sub">p={p_value:.2g}</span>'
    checked = _num(mark.get("checked"))
    title = f' title="{int(checked)} instances checked"' if checked is not None else ""
    return f"<td{title}>{cell}</td>"


_ATTACK_COLUMNS: Final = (
    "sent",
    "answered",
    "first refusal / challenge",
    "work (s)",
    "fidelity (best clone)",
    "accuracy",
    "watermark",
)


def _attack_cells(attack: Mapping[str, Any] | None) -> str:
    if attack is None:
        return "".join(
            f'<td class="{"run-start " if i == 0 else ""}missing">{MISSING}</td>'
            for i in range(len(_ATTACK_COLUMNS))
        )
    fidelity, accuracy = _best_clone(attack)
    cells = [
        _count(attack.get("sent")),
        _count(attack.get("answered")),
        _count(attack.get("first_refusal")),
        _fixed(attack.get("work_s"), 2),
        _fixed(fidelity, 3),
        _fixed(accuracy, 3),
    ]
    first = f'<td class="run-start num">{cells[0]}</td>'
    rest = "".join(f'<td class="num">{c}</td>' for c in cells[1:])
    return first + rest + _watermark_cell(attack.get("watermark"))


def _attack_table(runs: Sequence[Mapping[str, Any]]) -> str:
    rows = _attack_rows(runs)
    if not rows:
        return '<p class="placeholder">no attacks in this report</p>'
    labels = [_run_label(run, i) for i, run in enumerate(runs)]
    head1 = "".join(
        f'<th scope="colgroup" colspan="{len(_ATTACK_COLUMNS)}" class="run-start">'
        f"{escape(label)}</th>"
        for label in labels
    )
    head2 = "".join(
        f'<th scope="col" class="{"run-start" if i == 0 else "metric"}">{escape(name)}</th>'
        for _ in runs
        for i, name in enumerate(_ATTACK_COLUMNS)
    )
    by_run = [{_attack_key(a): a for a in _maps(run.get("attacks"))} for run in runs]
    body = "".join(
        f'<tr><th scope="row">{escape(row)}</th>'
        + "".join(_attack_cells(attacks.get(row)) for attacks in by_run)
        + "</tr>"
        for row in rows
    )
    return (
        '<div class="scroll"><table class="attacks"><thead>'
        f'<tr><th scope="col" rowspan="2">attack</th>{head1}</tr><tr>{head2}</tr>'
        f"</thead><tbody>{body}</tbody></table></div>"
    )


def _benign_table(runs: Sequence[Mapping[str, Any]]) -> str:
    columns = ("clients", "queries", "refusals", "challenges", "top-1 changes (share)")
    head = "".join(f'<th scope="col">{name}</th>' for name in columns)
    body = []
    for i, run in enumerate(runs):
        benign = run.get("benign")
        if not isinstance(benign, Mapping):
            cells = (
                f'<td colspan="{len(columns)}" class="missing">{MISSING} (no benign workload)</td>'
            )
        else:
            values = [
                _count(benign.get(k)) for k in ("clients", "queries", "refusals", "challenges")
            ]
            values.append(_share(benign.get("top1_changes")))
            cells = "".join(f'<td class="num">{v}</td>' for v in values)
        body.append(f'<tr><th scope="row">{escape(_run_label(run, i))}</th>{cells}</tr>')
    return (
        '<div class="scroll"><table class="benign"><thead>'
        f'<tr><th scope="col">run</th>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        "</table></div>"
    )


def _fidelity_chart(runs: Sequence[Mapping[str, Any]], colors: Mapping[str, str]) -> str:
    """Plot each (attack, run)'s curve: fidelity against instances answered (else sent)."""
    curves = [
        (i, attack, _maps(attack.get("curve")))
        for i, run in enumerate(runs)
        for attack in _maps(run.get("attacks"))
    ]
    points = [p for _, _, curve in curves for p in curve if _num(p.get("fidelity")) is not None]
    x_key = "answered" if all(_num(p.get("answered")) is not None for p in points) else "sent"
    series = []
    for i, attack, curve in curves:
        pts = [
            (x, y)
            for p in curve
            if (x := _num(p.get(x_key))) is not None and (y := _num(p.get("fidelity"))) is not None
        ]
        key = _attack_key(attack)
        series.append(
            Series(
                label=f"{key} · {_run_label(runs[i], i)}",
                points=tuple(pts),
                color=colors.get(key, PALETTE[0]),
                dash=RUN_DASHES[i % len(RUN_DASHES)],
            )
        )
    if not any(s.points for s in series):
        return f'<p class="placeholder">{NO_CURVE}</p>'
    return line_chart(
        series,
        title="Fidelity of the best clone against queries",
        x_label=f"instances {x_key}",
        y_label="fidelity",
    )


def _risk_points(samples: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Group risk samples by their ``client`` field ("" when absent) into (sent, score) points."""
    grouped: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        x, y = _num(sample.get("sent")), _num(sample.get("score"))
        if x is not None and y is not None:
            client = sample.get("client")
            grouped.setdefault("" if client is None else str(client), []).append((x, y))
    return grouped


def _threshold_rules(document: Mapping[str, Any]) -> list[Rule]:
    thresholds = _map(document.get("thresholds"))
    return [
        Rule(label=name, y=value, color=color)
        for name, color in LEVELS
        if (value := _num(thresholds.get(name))) is not None
    ]


def _risk_charts(
    document: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], colors: Mapping[str, str]
) -> str:
    """Plot, per run with risk samples, each attack's and benign client's risk over sent."""
    rules = _threshold_rules(document)
    sections = []
    for i, run in enumerate(runs):
        series = []
        for attack in _maps(run.get("attacks")):
            key = _attack_key(attack)
            for client, pts in _risk_points(_maps(attack.get("risk"))).items():
                label = f"{key} ({client})" if client else key
                series.append(Series(label, tuple(pts), colors.get(key, PALETTE[0])))
        benign = _map(run.get("benign"))
        for client, pts in _risk_points(_maps(benign.get("risk"))).items():
            label = f"benign {client}" if client else "benign"
            series.append(Series(label, tuple(pts), BENIGN_COLOR, BENIGN_DASH))
        if series:
            chart = line_chart(
                series,
                title=f"Risk over time per client: {_run_label(run, i)}",
                x_label="instances sent by the client",
                y_label="risk score",
                rules=rules,
            )
            sections.append(f"<h3>{escape(_run_label(run, i))}</h3>\n{chart}")
    if not sections:
        return f'<p class="placeholder">{escape(NO_RISK)}</p>'
    return "\n".join(sections)


def _meta(document: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    items = [
        ("started", _text(document.get("started"))),
        ("seed", _text(document.get("seed"))),
        ("budget per attack", _text(document.get("budget"))),
        ("batch", _text(document.get("batch"))),
        ("dialect", _text(document.get("dialect"))),
    ]
    thresholds = _map(document.get("thresholds"))
    if thresholds:
        levels = ", ".join(f"{escape(str(k))} {_text(v)}" for k, v in thresholds.items())
        items.append(("risk thresholds", levels))
    items += [
        (f"target ({_run_label(run, i)})", f"<code>{_text(run.get('target'))}</code>")
        for i, run in enumerate(runs)
    ]
    rows = "".join(f"<dt>{escape(name)}</dt><dd>{value}</dd>" for name, value in items)
    return f'<dl class="meta">{rows}</dl>'


_CSS: Final = """
body { margin: 0; background: #fff; color: #1b1b1b;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 12px; }
h2 { font-size: 1.25em; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 16px 0 4px; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
.meta dt { color: #555; } .meta dd { margin: 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.95em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e5e5e5; text-align: left; white-space: nowrap; }
thead th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; }
.run-start { border-left: 2px solid #bbb; }
.missing { color: #999; }
.stolen { color: #c0392b; font-weight: 600; } .clean { color: #1e7b34; }
.sub { color: #666; font-size: 0.85em; }
.placeholder { color: #666; font-style: italic; }
.note { color: #555; }
svg.chart { width: 100%; max-width: 1000px; height: auto; font-size: 12px; }
svg.chart .plot-box { fill: none; stroke: #888; }
svg.chart .grid { stroke: #eee; }
svg.chart .tick { fill: #444; }
svg.chart .axis-label { fill: #222; font-weight: 600; }
svg.chart .series { fill: none; stroke-width: 2; stroke-linejoin: round; }
svg.chart .rule { stroke-width: 1.5; }
svg.chart .legend line { stroke-width: 2; }
svg.chart .legend text { fill: #222; }
"""


def render_html(document: Mapping[str, Any]) -> str:
    """Return the red-team report ``document`` (JSON version 2) as one self-contained HTML page.

    Tolerate nulls, missing fields and empty lists anywhere: such cells read "–" and empty
    plot sections say why they are empty.
    """
    runs = _maps(document.get("runs"))
    rows = _attack_rows(runs)
    colors = _color_of(rows)
    started = document.get("started")
    title = "Red-team report" + (f" — {started}" if started not in (None, "") else "")
    if runs:
        attacks = _attack_table(runs)
        benign = _benign_table(runs)
    else:
        attacks = benign = f'<p class="placeholder">{NO_RUNS}</p>'
    version = document.get("version")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            "<main>",
            f"<h1>{escape(title)}</h1>",
            _meta(document, runs),
            "<h2>Attacks</h2>",
            '<p class="note">One row per attack, one column group per run. "first refusal /'
            ' challenge" counts the instances sent before the first refusal or challenge;'
            " fidelity is the agreement of the best clone with the victim.</p>",
            attacks,
            "<h2>Benign workload</h2>",
            benign,
            "<h2>Fidelity against queries</h2>",
            '<p class="note">One line per attack and run; later runs are dashed.</p>',
            _fidelity_chart(runs, colors),
            "<h2>Risk over time per client</h2>",
            '<p class="note">Dashed horizontal lines are the risk-level thresholds;'
            " benign clients are dotted grey.</p>",
            _risk_charts(document, runs, colors),
            f'<p class="note">Report format version {_text(version)}.</p>',
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )
