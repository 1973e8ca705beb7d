"""Where the test suite's time goes: wall time and machine-wide CPU time of every test.

    PYTHONPATH=benchmarks make test PYTEST_ARGS="-p pytest_cpu"
    PYTHONPATH=benchmarks make test PYTEST_ARGS="-p pytest_cpu tests/test_fault_tolerance.py"

A pytest plugin. For each test (setup, call and teardown together) it records the wall time and
the CPU time every process on the machine spent meanwhile (/proc/stat, Linux), so the Ray, MLflow
and S3 server processes a test drives are counted with it. At the end it writes a table, slowest
first, to $PYTEST_CPU_OUT (default suite-cpu.txt): wall s, CPU s, and how busy the cores were.
A test near 100% is bound by CPU work (shorten it by doing less); one far below waits on
something (a sleep, a poll, a server starting).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

_rows: list[tuple[float, float, str]] = []


def _busy_seconds() -> float:
    """CPU seconds spent by the whole machine since boot, idle and iowait excluded."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _busy_seconds(), time.monotonic()
    yield
    _rows.append((time.monotonic() - wall, _busy_seconds() - cpu, item.nodeid))


def pytest_sessionfinish(session) -> None:
    if not _rows:
        return
    cores = os.cpu_count() or 1
    wall, cpu = sum(r[0] for r in _rows), sum(r[1] for r in _rows)
    lines = [
        f"{'wall s':>8} {'CPU s':>8} {'busy':>5}  test",
        f"{wall:8.1f} {cpu:8.1f} {cpu / max(wall, 1e-9) / cores:5.0%}  (all)",
    ]
    lines += [
        f"{w:8.1f} {c:8.1f} {c / w / cores if w else 0:5.0%}  {name}" for w, c, name in sorted(_rows, reverse=True)
    ]
    out = Path(os.environ.get("PYTEST_CPU_OUT", "suite-cpu.txt"))
    out.write_text("\n".join(lines) + "\n")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"per-test wall and CPU time: {out}")
