"""``bench compare A B [C ...]``: paired significance tests between upstreams on the same test items.

Each argument is an upstream name, looked up among the results under ``--results`` (default ``results``), or a
directory (a run directory, or any folder of results such as ``results/apc-synth``). Its rows are selected exactly
as the leaderboard selects them (``leaderboard/tables.py`` rules 1-3: the selected learning rate, the test split,
the newest duplicate) and averaged the same way (folds, then seeds).

The first argument is compared with each of the others, on every (task metric, corpus, profile) both have. For each
such pair: the two values, the difference (first minus other, in the metric's unit), its paired-bootstrap interval
and p-value (:func:`leaderboard.stats.paired_bootstrap`), McNemar's exact p-value for accuracy metrics of
single-seed runs, and Holm's adjustment of the bootstrap p-values over every test of the invocation. The verdict is
"<name> better" when the Holm-adjusted p-value is at most ``alpha`` (the better side follows the metric's
direction), else "no significant difference". Pairs whose test items differ are refused with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from speechbench.common import SpeechbenchError
from speechbench.leaderboard.cells import cell_key, load_cell
from speechbench.leaderboard.collect import collect_results
from speechbench.leaderboard.items import ItemsError
from speechbench.leaderboard.stats import (
    CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    BootstrapError,
    holm,
    paired_bootstrap,
    same_items,
)
from speechbench.leaderboard.tables import counted_rows

ALPHA = 0.05


class CompareError(SpeechbenchError, ValueError):
    """Two sets of results that cannot be compared (nothing in common, different test items, ...)."""


@dataclass(frozen=True)
class Comparison:
    """One paired test: ``a`` versus ``b`` on ``column`` (``corpus``/``profile`` as in the wide table)."""

    a: str
    b: str
    column: str
    corpus: str
    profile: str
    unit: str
    higher_is_better: bool
    value_a: float
    value_b: float
    difference: float
    ci_lo: float
    ci_hi: float
    p_bootstrap: float
    p_mcnemar: float | None
    discordant: tuple[int, int] | None
    p_holm: float
    verdict: str
    items: int


def select(spec: str, results_dir: str | Path = "results", split: str = "test") -> pd.DataFrame:
    """The counted result rows of one argument: a directory of results, or an upstream name under ``results_dir``."""
    path = Path(spec)
    if path.is_dir():
        rows = counted_rows(collect_results(path), split)
        names = sorted(set(rows["upstream"]))
        if len(names) > 1:
            raise CompareError(f"{spec} holds results of several upstreams ({', '.join(names)}); pass one upstream's "
                               f"folder or its name")
        return rows
    long = collect_results(results_dir)
    rows = long[long["upstream"] == spec]
    if rows.empty:
        raise CompareError(f"no results for upstream {spec!r} under {results_dir} (upstreams there: "
                           f"{', '.join(sorted(set(long['upstream'])))}); or pass a results directory")
    return counted_rows(rows, split)


def _cells(rows: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Counted rows grouped by ``(column, corpus, profile)``."""
    keys = [cell_key(r) for _, r in rows.iterrows()]
    rows = rows.assign(_key=[(k[3], k[1], k[2]) for k in keys])
    return {key: group for key, group in rows.groupby("_key", sort=True)}


def _where(key: tuple) -> str:
    column, corpus, profile = key
    return f"{column} ({corpus}{'/' + profile if profile else ''})"


def compare(specs: list[str], results_dir: str | Path = "results", resamples: int = DEFAULT_RESAMPLES,
            seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE, alpha: float = ALPHA) -> list[Comparison]:
    """Compare ``specs[0]`` with each of ``specs[1:]``; see the module docstring."""
    if len(specs) < 2:
        raise CompareError("compare needs at least two upstreams or result directories")
    if len(set(specs)) < len(specs):
        raise CompareError(f"the same argument is given twice: {' '.join(specs)}")
    if resamples < 1:
        raise CompareError(f"--resamples must be at least 1, got {resamples}")
    sides = [_cells(select(s, results_dir)) for s in specs]
    tests = []
    for spec, cells in zip(specs[1:], sides[1:], strict=True):
        common = sorted(set(sides[0]) & set(cells))
        if not common:
            raise CompareError(f"{specs[0]} and {spec} have no task in common on the same corpus ({specs[0]}: "
                               f"{', '.join(map(_where, sides[0])) or 'none'}; {spec}: "
                               f"{', '.join(map(_where, cells)) or 'none'})")
        for key in common:
            rows_a, rows_b = sides[0][key], cells[key]
            try:
                cell_a, cell_b = load_cell(rows_a), load_cell(rows_b)
            except ItemsError as e:
                raise CompareError(f"cannot compare {_where(key)}: {e}") from None
            cell_b = _paired(cell_a, cell_b, f"{specs[0]} and {spec} on {_where(key)}")
            try:
                result = paired_bootstrap(cell_a, cell_b, resamples, seed, confidence)
            except BootstrapError as e:
                raise CompareError(f"cannot compare {specs[0]} and {spec} on {_where(key)}: {e}") from None
            first = rows_a.iloc[0]
            tests.append((spec, key, first, result, sum(len(v) for v in cell_a.values())))
    adjusted = holm([t[3].p_bootstrap for t in tests])
    out = []
    for (spec, key, first, r, n_items), p_holm in zip(tests, adjusted, strict=True):
        higher = bool(first["higher_is_better"])
        if p_holm <= alpha:
            verdict = f"{specs[0] if (r.difference > 0) == higher else spec} better"
        else:
            verdict = "no significant difference"
        out.append(Comparison(specs[0], spec, key[0], key[1], key[2], str(first["unit"] or ""), higher, r.value_a,
                              r.value_b, r.difference, r.interval[0], r.interval[1], r.p_bootstrap, r.mcnemar_p,
                              r.discordant, p_holm, verdict, n_items))
    return out


def _paired(cell_a: dict, cell_b: dict, what: str) -> dict:
    """``cell_b`` with every run aligned to ``cell_a``'s item order; refuses different folds or test items."""
    folds_a, folds_b = sorted({f for f, _ in cell_a}, key=str), sorted({f for f, _ in cell_b}, key=str)
    if folds_a != folds_b:
        raise CompareError(f"cannot pair {what}: different folds ({folds_a} vs {folds_b})")
    aligned = {}
    for (fold, seed_), items in cell_b.items():
        ref = next(v for (f, _), v in cell_a.items() if f == fold)
        why = same_items(ref, items)
        if why:
            raise CompareError(f"cannot pair {what}: their test items differ ({why}); they were not scored on the "
                               f"same test set")
        aligned[(fold, seed_)] = items.aligned_to(ref.ids)
    return aligned


def format_comparisons(comparisons: list[Comparison], resamples: int, seed: int, confidence: float = CONFIDENCE,
                       alpha: float = ALPHA) -> str:
    """The text table ``bench compare`` prints, with a footer that says how to read it."""
    pct = f"{100 * confidence:g}%"
    header = ["metric", "corpus", "A", "B", "value A", "value B", "A - B", f"{pct} CI", "p boot", "p McNemar",
              "p Holm", "verdict"]
    body = []
    for c in comparisons:
        arrow = "higher" if c.higher_is_better else "lower"
        body.append([f"{c.column} ({c.unit} {arrow})".replace("( ", "("), c.corpus + (f"/{c.profile}" if c.profile
                                                                                      else ""),
                     c.a, c.b, f"{c.value_a:.2f}", f"{c.value_b:.2f}", f"{c.difference:+.2f}",
                     f"[{c.ci_lo:+.2f}, {c.ci_hi:+.2f}]", _p(c.p_bootstrap), _p(c.p_mcnemar), _p(c.p_holm), c.verdict])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    right = [4, 5, 6, 8, 9, 10]  # numbers: right-aligned

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [line(r) for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(comparisons)} paired test(s): {resamples} paired bootstrap resamples over the same test items "
                 f"(seed {seed}; ASV resamples enrolment speakers, ER utterances within folds)")
    lines.append(f"verdict: the bootstrap p-value after Holm's correction over all {len(comparisons)} tests, at level "
                 f"{alpha:g}; A - B is in the metric's unit")
    floor = 2 / (resamples + 1) * len(comparisons)
    if floor > alpha:
        lines.append(f"note: with {resamples} resamples the smallest Holm-adjusted p-value is {floor:.3g} > {alpha:g}: "
                     f"no difference can be significant; raise --resamples")
    if any(c.corpus == "synth" for c in comparisons):
        lines.append("synth = synthetic smoke-benchmark corpus, not SUPERB numbers")
    return "\n".join(lines)


def comparisons_to_records(comparisons: list[Comparison]) -> list[dict]:
    """Plain dicts for ``--json``."""
    return [asdict(c) for c in comparisons]


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"
