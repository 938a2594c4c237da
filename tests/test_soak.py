"""The soak script, short: 30 mixed predictions through a real Cog server must leave nothing behind.

`scripts/soak.py --count 300` is the real soak (a few minutes); this runs the same code on a tenth of
it, so a leaked file, descriptor or thread, or a LoRA switch undone wrong, shows up in the default run.
RSS over 30 predictions is noise (the allocator is still finding its high-water mark), so it is only
printed, with a bound (3x) that catches only runaway growth.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_soak() -> ModuleType:
    """`scripts/` is not a package: load the script as a module (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("flux_day_soak", ROOT / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_has_no_unexpected_failure_and_leaves_nothing_behind(tmp_path: Path) -> None:
    soak = load_soak()
    report = soak.run_soak(count=30, seed=0, workdir=tmp_path)
    print(soak.format_report(report))
    assert report.unexpected == [], soak.format_report(report)
    for key in ("fds", "threads", "tmp", "coglet_files", "lora_cache"):
        metric = report.metric(key)
        assert metric.after <= metric.before, soak.format_report(report)
    categories = {"rejected": "failed"}
    seen = {categories.get(outcome.status, outcome.status) for outcome in report.outcomes}
    assert {"succeeded", "failed", "canceled"} <= seen, seen
    rss = report.metric("rss_total")
    assert rss.after < 3 * rss.before, soak.format_report(report)
