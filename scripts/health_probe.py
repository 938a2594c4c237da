"""Kubernetes probes and preStop hook for the Cog server in this container, read from /health-check.

Usage: `python scripts/health_probe.py started|ready|alive|idle [--port N] [--timeout S] [--settle S]`.

coglet answers `/health-check` with HTTP 200 in every state (STARTING, READY, BUSY, SETUP_FAILED,
DEFUNCT), so an `httpGet` probe cannot tell them apart; this reads the status from the body.

- `started` (startupProbe): setup has finished, well or not (anything but STARTING and no answer),
  so that the liveness probe takes over at once and restarts a container whose setup failed.
- `ready` (readinessProbe): READY. The server takes up to its concurrency (cog.yaml) predictions at
  once and answers 409 past it (BUSY), so a replica with every slot taken leaves the Service's
  endpoints until one is free again.
- `alive` (livenessProbe): the server answers, and its setup has not failed (SETUP_FAILED, DEFUNCT):
  a failed setup (a weights volume not filled yet, say) restarts the container, with backoff.
- `idle` (preStop hook): wait `--settle` seconds for the Service to stop sending requests here, then
  until no prediction runs (at most `--timeout` seconds), so the SIGTERM that follows cuts none off.
  READY only says a slot is free: the predictor keeps the number running in
  `/tmp/flux-day-running-<port>` (`flux_day.serving.running_predictions_file`), and this waits for 0.

Exit status 0 when the condition holds, 1 when not, with the status on stdout (`kubectl describe pod`
shows it). Standard library only: a probe starts a fresh interpreter every few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

CHECKS = {
    "started": {"READY", "BUSY", "SETUP_FAILED", "DEFUNCT"},
    "ready": {"READY"},
    "alive": {"STARTING", "READY", "BUSY"},
}


def status(port: int, timeout_s: float = 3) -> str:
    """The server's status, or UNREACHABLE when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health-check", timeout=timeout_s) as response:
            return str(json.load(response).get("status", "UNKNOWN"))
    except (OSError, ValueError):
        return "UNREACHABLE"


def running(port: int) -> int:
    """How many predictions the server on `port` says run (0 when it keeps no count)."""
    try:
        return int(Path("/tmp", f"flux-day-running-{port}").read_text())
    except (OSError, ValueError):
        return 0


def wait_until_idle(port: int, timeout_s: float, settle_s: float) -> str:
    """Sleep `settle_s`, then poll until no prediction runs or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    time.sleep(settle_s)
    while ((now := status(port)) == "BUSY" or running(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return now if not running(port) else "BUSY"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("check", choices=[*CHECKS, "idle"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 5000))
    parser.add_argument("--timeout", type=float, default=600, help="idle: the longest wait (seconds)")
    parser.add_argument("--settle", type=float, default=5, help="idle: the first pause (seconds)")
    args = parser.parse_args(argv)
    if args.check == "idle":
        now = wait_until_idle(args.port, args.timeout, args.settle)
        print(now)
        return 0 if now != "BUSY" else 1
    now = status(args.port)
    print(now)
    return 0 if now in CHECKS[args.check] else 1


if __name__ == "__main__":
    sys.exit(main())
