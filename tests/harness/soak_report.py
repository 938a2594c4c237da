"""The soak's report: the metrics table with targets and verdicts, counts per request kind, failures."""

from __future__ import annotations

import statistics
from collections import Counter

from tests.harness.soak import Outcome, SoakReport, rss_windows


def format_report(report: SoakReport) -> str:
    """The metrics table, counts per kind and status, and every unexpected failure."""
    lines = [
        f"soak: {report.count} predictions, seed {report.seed}, setup {report.setup_s:.0f} s, "
        f"run {report.run_s:.0f} s, after a warm-up of {len(report.framing) - 1} requests",
        "",
        *table(metric_rows(report)),
        rss_note(len(report.rss)),
        "",
        *table(count_rows(report.outcomes)),
    ]
    if report.rss:
        every = [
            (i, kib) for i, (kib, _) in enumerate(report.rss, start=1) if i % 25 == 0 or i == len(report.rss)
        ]
        lines += [
            "",
            "RSS (MiB) after prediction: " + ", ".join(f"{i}: {kib / 1024:.0f}" for i, kib in every),
        ]
    if report.unexpected:
        lines += ["", "unexpected failures:"] + [
            f"  {'#' + str(o.index) if 0 < o.index <= report.count else 'framing'} {o.kind}: {o.problem}"
            for o in report.unexpected
        ]
    if report.notes:
        lines += ["", "notes:"] + [f"  {note}" for note in report.notes]
    return "\n".join(lines)


def rss_note(count: int) -> str:
    """Which predictions the RSS medians are over."""
    before, after = rss_windows(count)
    return (
        f"(RSS: median after predictions {before.start}-{before.stop - 1} -> {after.start}-{after.stop - 1};"
        " the rest: after warm-up -> after the run)"
    )


def metric_rows(report: SoakReport) -> list[tuple[str, ...]]:
    """The measured rows and the unexpected-failure count, each with its target and verdict."""

    def number(value: float) -> str:
        return f"{value:g}" if value == int(value) else f"{value:.1f}"

    rows = [("metric", "before", "after", "change", "target", "")]
    for m in report.metrics:
        relative = m.key.startswith("rss") and m.before > 0
        change = f"{(m.after - m.before) / m.before:+.1%}" if relative else f"{m.after - m.before:+g}"
        verdict = {True: "met", False: "NOT met", None: "-"}[m.met]
        rows.append((m.name, number(m.before), number(m.after), change, m.target, verdict))
    unexpected = len(report.unexpected)
    rows.append(("unexpected failures", "", str(unexpected), "", "0", "NOT met" if unexpected else "met"))
    return rows


def count_rows(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    """Per request kind: how many ended in each status, how many were unexpected, median seconds."""
    statuses = ["succeeded", "failed", "rejected", "canceled"]
    statuses += sorted({o.status for o in outcomes} - set(statuses))
    rows = [("kind", "expect", *statuses, "unexpected", "median s")]
    for kind in sorted({o.kind for o in outcomes}):
        mine = [o for o in outcomes if o.kind == kind]
        counts = Counter(o.status for o in mine)
        rows.append(
            (
                kind,
                mine[0].expect,
                *(str(counts[s] or "") for s in statuses),
                str(sum(o.problem is not None for o in mine) or ""),
                f"{statistics.median(o.seconds for o in mine):.2f}",
            )
        )
    totals = Counter(o.status for o in outcomes)
    rows.append(
        (
            "all",
            "",
            *(str(totals[s]) for s in statuses),
            str(sum(o.problem is not None for o in outcomes)),
            f"{statistics.median(o.seconds for o in outcomes):.2f}" if outcomes else "",
        )
    )
    return rows


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
