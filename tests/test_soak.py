"""The soak script, short: 30 mixed predictions from 4 concurrent clients through a real Cog server must
leave nothing behind.

`scripts/soak.py --count 300` is the real soak (a few minutes); this runs its core (`tests/harness/soak.py`)
on a tenth of it, so a leaked file, descriptor or thread, or a LoRA switch undone wrong, shows up in the
default run.
RSS over 30 predictions is noise (the allocator is still finding its high-water mark), so it is only
printed, with a bound (3x) that catches only runaway growth.
"""

from __future__ import annotations

from pathlib import Path

from tests.harness.soak import run_soak
from tests.harness.soak_report import format_report


def test_a_short_soak_has_no_unexpected_failure_and_leaves_nothing_behind(tmp_path: Path) -> None:
    report = run_soak(count=30, seed=0, workdir=tmp_path, clients=4)
    print(format_report(report))
    assert report.unexpected == [], format_report(report)
    for key in ("fds", "threads", "tmp", "coglet_files", "lora_cache"):
        metric = report.metric(key)
        assert metric.after <= metric.before, format_report(report)
    categories = {"rejected": "failed"}
    seen = {categories.get(outcome.status, outcome.status) for outcome in report.outcomes}
    assert {"succeeded", "failed", "canceled"} <= seen, seen
    rss = report.metric("rss_total")
    assert rss.after < 3 * rss.before, format_report(report)
