"""The benchmark runner still runs: its quickest mode, tiny windows, a few hundred calls.

Timings never decide anything here; only that the runner finishes and prints its tables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_runner_prints_a_table() -> None:
    env = dict(os.environ)
    env.pop("FORKCORE_DISABLE_PLUGIN_AUTOLOAD", None)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--duration", "0.05", "--warmup",
         "0.02", "--repeat", "1", "--peers", "anyio-coalesced",
         "--scenarios", "core,multi,strategies,memory", "--strategy-servers", "10",
         "--passes", "1", "--connections", "2", "--activations", "20", "--settle", "0.1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "## Machine" in out
    assert "| party" in out and "calls/s" in out and "p99 µs" in out
    rows = [line for line in out.splitlines() if line.startswith("| forkcore typed proxy")]
    assert len(rows) == 2, out  # 1 and 64 in flight
    assert "raw anyio TCP, coalesced writes" in out
    assert "## Strategy select()" in out
    assert "## Memory" in out
    assert "## Targets" in out


def test_missing_peer_is_skipped_with_a_note() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.runner import Bench, Peer, Report, parse_args, render
    finally:
        sys.path.remove(str(ROOT))
    report = Report()
    opts = parse_args(["--quick"])
    run = Bench(opts, report).peer(Peer("ghost", "ghost peer", "benchmarks.peers.ghost",
                                        ("no_such_module_for_forkcore_bench",)))
    assert run.note is not None and run.note.startswith("skipped:")
    assert "requirements.txt" in run.note
    info = {"cpu": "cpu", "cores": 2, "usable_cores": 2, "memory": "1 GiB", "python": "3",
            "os": "os", "backend": "asyncio", "packages": {}, "load_before": None,
            "settings": {"duration": 0.1, "warmup": 0.0, "repeat": 1, "concurrency": [1, 64]}}
    assert "## Targets" in render(report, info, opts)
