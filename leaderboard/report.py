"""``bench leaderboard RESULTS --report DIR``: a report a person reads.

Writes ``DIR/index.html``, one self-contained page (inline CSS, figures embedded as data URIs, no script, nothing
fetched): the leaderboard with each cell's interval, the best value of every metric column marked within each
comparable group of rows (same corpus and profile), the SUPERB score with the reference set it used, the cost
columns, the notes that say what may be compared with what, and the layer-weight figures. ``DIR/leaderboard.md`` is
the same table as Markdown (best values in bold) with the same notes, for a README or a paper draft. The figures are
also kept as files in ``DIR/figures/`` (PNG and SVG).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from speechbench.common import atomic_write_text
from speechbench.leaderboard.columns import column_direction
from speechbench.leaderboard.plots import Figure
from speechbench.leaderboard.references import ReferenceSet
from speechbench.leaderboard.tables import KEY_COLUMNS, REAL, REAL_FOOTER, SYNTH, SYNTH_FOOTER, units_of

COST = ("params_m", "gflops_per_audio_s", "rtf")
COST_HEADERS = {"params_m": ("params", "millions"), "gflops_per_audio_s": ("GFLOPs / audio s", "lower"),
                "rtf": ("real-time factor", "lower")}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.7em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.key, th.key { text-align: left; }
td.best { font-weight: bold; background: #e8f4e8; }
.ci { display: block; color: #666; font-size: 0.8em; white-space: nowrap; }
.unit { display: block; font-weight: normal; color: #666; font-size: 0.8em; }
.meta, .notes { color: #444; } figure { display: inline-block; vertical-align: top; margin: 0.5em 1em 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: 0.85em; color: #555; }
"""


def metric_columns(wide: pd.DataFrame) -> list[str]:
    """The task-metric columns of a wide table (those with a known direction), in table order."""
    skip = set(KEY_COLUMNS) | {"SUPERB_score", "SUPERB_reference", "cost_device", *COST}
    return [c for c in wide.columns if c not in skip and not c.endswith(("_lo", "_hi", "_folds", "_seeds"))
            and column_direction(c) is not None]


def best_cells(wide: pd.DataFrame) -> set[tuple[int, str]]:
    """``(row position, column)`` of the best value of every metric column (and ``SUPERB_score``) within each group
    of rows on the same corpus and profile; ties are all marked."""
    best = set()
    columns = metric_columns(wide) + (["SUPERB_score"] if "SUPERB_score" in wide.columns else [])
    groups = wide.reset_index(drop=True).groupby(["corpus", "profile"], sort=False).groups
    for col in columns:
        higher = True if col == "SUPERB_score" else column_direction(col)
        for positions in groups.values():
            values = wide[col].reset_index(drop=True).loc[positions].astype(float).dropna()
            if values.empty:
                continue
            target = values.max() if higher else values.min()
            best |= {(int(i), col) for i in values.index[np.isclose(values, target)]}
    return best


def report_notes(wide: pd.DataFrame, reference: ReferenceSet | None) -> list[str]:
    """The comparability notes shown under the table (plain text)."""
    notes = []
    corpora = set(wide["corpus"]) if "corpus" in wide.columns else set()
    if SYNTH in corpora:
        notes.append(f"{SYNTH_FOOTER}. Rows of different corpora or synthetic profiles are never comparable; the best "
                     f"value is marked within each (corpus, profile) group.")
    if REAL in corpora:
        notes.append(REAL_FOOTER + ".")
    spec = wide.attrs.get("intervals")
    if spec:
        notes.append(f"Intervals: {100 * spec['confidence']:g} % percentile bootstrap over the test items "
                     f"({spec['resamples']} resamples, seed {spec['seed']}); WER, PER and EER are recomputed on every "
                     f"resample, ASV resamples enrolment speakers, ER resamples within each fold and averages the "
                     f"folds. Overlapping intervals do not show that two upstreams are equal: use bench compare for a "
                     f"paired test on the same items.")
    notes += wide.attrs.get("interval_notes", [])
    if reference is not None:
        scored = "SUPERB_score" in wide.columns and wide["SUPERB_score"].notna().any()
        notes.append(f"SUPERB score: 1000 x mean over the {len(reference.metric_columns)} tasks of (score - "
                     f"{reference.baseline}) / (best - {reference.baseline}), reference set {reference.name} "
                     f"({reference.date}; {reference.source}). "
                     + ("Only real-corpus rows with every task are scored." if scored else
                        "No row qualifies (it needs real-corpus results on every task)."))
    if "cost_device" in wide.columns and (devices := sorted(set(wide["cost_device"]) - {""})):
        notes.append("Cost: parameters and GFLOPs per audio second counted with torch.utils.flop_counter on a 10 s "
                     "input (matrix products and convolutions); real-time factor = compute seconds per audio second, "
                     f"measured on {'; '.join(devices)} (machine-dependent; noisy on a shared machine).")
    folds = [c for c in wide.columns if c.endswith("_folds")]
    if folds:
        notes.append("Fold tasks (" + ", ".join(c[: -len("_folds")] for c in folds) + ") show the mean over folds; "
                     "a cell averaged over fewer folds than another is not comparable with it (see the _folds "
                     "column of the CSV).")
    return notes


def _value(col: str, value) -> str:
    if value is None or pd.isna(value):
        return "–"
    if col in ("gflops_per_audio_s", "rtf"):
        return f"{value:.3g}"
    return f"{value:.1f}" if col == "SUPERB_score" else f"{value:.2f}"


def _shown_columns(wide: pd.DataFrame) -> list[str]:
    keys = ["upstream", "corpus"] + (["profile"] if (wide.get("profile", pd.Series(dtype=str)) != "").any() else [])
    cost = [c for c in COST if c in wide.columns and wide[c].notna().any()]
    score = ["SUPERB_score"] if "SUPERB_score" in wide.columns and wide["SUPERB_score"].notna().any() else []
    return keys + metric_columns(wide) + score + cost


def _header(col: str, units: dict) -> tuple[str, str]:
    if col in COST_HEADERS:
        return COST_HEADERS[col]
    if col == "SUPERB_score":
        return "SUPERB score", "higher"
    return col, units.get(col, "")


@dataclass(frozen=True)
class _Cell:
    """One rendered cell: the column, its value as text, its interval as text (or ""), and whether it is the best."""

    column: str
    text: str
    interval: str
    best: bool


def _table(wide: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str], list[list[_Cell]]]:
    """What both renderings show: ``(title, unit)`` per column, the columns, and the rows of cells."""
    units, best = units_of(wide), best_cells(wide)
    shown = _shown_columns(wide)
    rows = []
    for i, (_, row) in enumerate(wide.reset_index(drop=True).iterrows()):
        cells = []
        for col in shown:
            if col in KEY_COLUMNS:
                cells.append(_Cell(col, str(row[col]), "", False))
                continue
            lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
            interval = "" if lo is None or hi is None or pd.isna(lo) or pd.isna(hi) else \
                f"[{_value(col, lo)}, {_value(col, hi)}]"
            cells.append(_Cell(col, _value(col, row[col]), interval, (i, col) in best))
        rows.append(cells)
    return [_header(col, units) for col in shown], shown, rows


def html_table(wide: pd.DataFrame) -> str:
    """The leaderboard as an HTML table (values with their interval, best values marked)."""
    headers, shown, rows = _table(wide)
    key = ' class="key"'
    head = "".join(f"<th{key if col in KEY_COLUMNS else ''}>{html.escape(title)}"
                   + (f'<span class="unit">{html.escape(unit)}</span>' if unit else "") + "</th>"
                   for (title, unit), col in zip(headers, shown, strict=True))
    body = []
    for cells in rows:
        tds = []
        for c in cells:
            cls = ' class="key"' if c.column in KEY_COLUMNS else \
                ' class="best" title="best in its corpus group"' if c.best else ""
            ci = f'<span class="ci">{c.interval}</span>' if c.interval else ""
            tds.append(f"<td{cls}>{html.escape(c.text)}{ci}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f'<table id="leaderboard">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body) + \
        "\n</tbody>\n</table>"


def markdown_table(wide: pd.DataFrame) -> str:
    """The leaderboard as a GitHub Markdown table (``value [lo, hi]``, best values in bold)."""
    headers, shown, rows = _table(wide)
    lines = ["| " + " | ".join(f"{title} ({unit})" if unit else title for title, unit in headers) + " |",
             "|" + "|".join(":---" if c in KEY_COLUMNS else "---:" for c in shown) + "|"]
    for cells in rows:
        texts = [(f"**{c.text}**" if c.best else c.text.replace("|", "\\|")) + (f" {c.interval}" if c.interval
                                                                                  else "") for c in cells]
        lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _figure_html(figure: Figure) -> str:
    """A figure embedded as an SVG data URI (self-contained; its ids cannot clash with another figure's)."""
    uri = "data:image/svg+xml;base64," + base64.b64encode(figure.svg.read_bytes()).decode("ascii")
    return (f'<figure class="{figure.kind}"><img src="{uri}" alt="{html.escape(figure.title)}"><figcaption>'
            f'{html.escape(figure.title)} (<a href="figures/{figure.svg.name}">SVG</a>, '
            f'<a href="figures/{figure.png.name}">PNG</a>)</figcaption></figure>')


def write_report(wide: pd.DataFrame, out_dir: str | Path, figures: list[Figure], reference: ReferenceSet | None,
                 source: str = "") -> tuple[Path, Path]:
    """Write ``index.html`` and ``leaderboard.md`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    notes = report_notes(wide, reference)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = f"Generated {stamp}" + (f" from {source}" if source else "") + f": {len(wide)} row(s)."
    if wide.empty:
        table_html, table_md = "<p>(empty leaderboard: no selected results on the reported split)</p>", \
            "(empty leaderboard: no selected results on the reported split)"
    else:
        table_html, table_md = html_table(wide), markdown_table(wide)
    heatmaps = [f for f in figures if f.kind == "heatmap"]
    figure_html = "".join(f"<h3>{title}</h3>\n" + "\n".join(_figure_html(f) for f in group)
                          for title, group in (("Per upstream: tasks x layers", heatmaps),
                                               ("Per task: one line per upstream",
                                                [f for f in figures if f.kind == "lines"])) if group)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>speechbench leaderboard</title>
<style>{CSS}</style>
</head>
<body>
<h1>speechbench leaderboard</h1>
<p class="meta">{html.escape(meta)} Best value per column (within rows of the same corpus and profile) in bold.</p>
{table_html}
<h2>Notes on comparability</h2>
<ul class="notes">
{"".join(f"<li>{html.escape(n)}</li>" for n in notes)}
</ul>
<h2>Layer weights</h2>
<p class="meta">Softmax weights of the learned weighted sum of hidden states (mean over the counted runs of each
cell): {len(heatmaps)} heat map(s), one per upstream, then one line plot per task.</p>
<div id="figures">
{figure_html or "<p>(no layer weights recorded)</p>"}
</div>
</body>
</html>
"""
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    markdown = out_dir / "leaderboard.md"
    atomic_write_text(markdown, "# speechbench leaderboard\n\n" + meta + "\n\n" + table_md + "\n\n"
                      + "".join(f"- {n}\n" for n in notes))
    return index, markdown
