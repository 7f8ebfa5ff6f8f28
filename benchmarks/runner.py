"""`python -m benchmarks`: forkcore and its peers measured in one run, side by side.

Every party runs as separate server and client processes on the loopback interface.
A client warms up, then runs `--repeat` timed windows of `--duration` seconds at each
concurrency; a table cell is the median over the windows. Ratios compare parties of the
same run only, so they hold across machines better than absolute numbers. The targets
of issue 7 are printed as PASS/MISS: information, never the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("core", "multi", "udp", "payload", "grains", "strategies", "memory")
SIZES = {"32 B": 32, "4 KiB": 4096, "256 KiB": 256 * 1024}
KIB = 1024


@dataclass(frozen=True)
class Peer:
    key: str
    label: str
    module: str
    requires: tuple[str, ...] = ()
    runs_on: str | None = None  # the backend it always uses, when it ignores --backend


PEERS = (
    Peer("grpc", "grpc.aio unary (protobuf)", "benchmarks.peers.grpc_echo",
         ("grpc", "grpc_tools", "google.protobuf"), "asyncio (grpc.aio)"),
    Peer("pyro5", "Pyro5", "benchmarks.peers.pyro_echo", ("Pyro5",), "threads"),
    Peer("anyio-send", "raw anyio TCP, one send per frame", "benchmarks.peers.anyio_send"),
    Peer("anyio-coalesced", "raw anyio TCP, coalesced writes",
         "benchmarks.peers.anyio_coalesced"),
    Peer("asyncio-protocol", "bare asyncio.Protocol, coalesced writes",
         "benchmarks.peers.asyncio_protocol", (), "asyncio"),
)
PEER_KEYS = tuple(p.key for p in PEERS)
FORKCORE = "benchmarks.forkcore_echo"
PACKAGES = ("forkcore", "forkcore-transport-tcp", "forkcore-transport-udp",
            "forkcore-strategies", "anyio", "cbor2", "trio", "uvloop", "grpcio",
            "grpcio-tools", "protobuf", "Pyro5")


@dataclass
class Run:
    """One measured party in one configuration: its results per concurrency."""

    key: str
    label: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    note: str | None = None  # why it has no results

    attempts: int = 0

    def rate(self, concurrency: int) -> float | None:
        r = self.results.get(concurrency)
        return None if r is None else float(r["rate"])

    def other_load(self) -> float | None:
        """The highest share of the machine other processes used during this run."""
        loads = [r["other_load"] for r in self.results.values()
                 if r.get("other_load") is not None]
        return max(loads) if loads else None


class Report:
    def __init__(self) -> None:
        self.runs: dict[str, Run] = {}
        self.strategies: list[dict[str, Any]] = []
        self.strategy_note: str | None = None
        self.memory: dict[str, dict[str, Any]] = {}
        self.memory_notes: list[str] = []
        self.notes: list[str] = []

    def add(self, run: Run) -> Run:
        self.runs[run.key] = run
        return run

    def rate(self, key: str, concurrency: int) -> float | None:
        run = self.runs.get(key)
        return None if run is None else run.rate(concurrency)


# -- processes ----------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


class PartyError(Exception):
    pass


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@contextlib.contextmanager
def servers(module: str, arg_lists: Sequence[list[str]], backend: str,
            timeout: float = 60.0) -> Iterator[tuple[list[str], list[int]]]:
    """Start one server process per argument list; yield their endpoints and process ids;
    stop them."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        endpoints = []
        for extra in arg_lists:
            err = Path(tempfile.mkstemp(prefix="forkcore-bench-", suffix=".log")[1])
            with err.open("wb") as err_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", module, "server", "--until-stdin-closes",
                     "--backend", backend, *extra],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_file, cwd=ROOT,
                    env=child_env())
            procs.append((proc, err))
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline().decode("utf-8", "replace").strip() if ready else ""
            if not line.startswith("READY "):
                raise PartyError(f"{module} server did not start: {line or 'no ready line'} "
                                 f"{_tail(err)}".strip())
            endpoints.append(line[len("READY "):])
        yield endpoints, [proc.pid for proc, _ in procs]
    finally:
        for proc, _ in procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc, err in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            err.unlink(missing_ok=True)


def client(module: str, args: list[str], backend: str, timeout: float) -> list[dict[str, Any]]:
    """Run one client process to completion; its RESULT lines."""
    try:
        done = subprocess.run([sys.executable, "-m", module, *args, "--backend", backend],
                              capture_output=True, cwd=ROOT, env=child_env(), timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PartyError(f"{module} client did not finish within {timeout:.0f}s") from None
    results = [json.loads(line[len("RESULT "):]) for line in
               done.stdout.decode("utf-8", "replace").splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise PartyError(f"{module} client failed (exit {done.returncode}): "
                         f"{' | '.join(lines[-3:]) or 'no output'}")
    return results


# -- measuring ----------------------------------------------------------------------------


class Bench:
    def __init__(self, opts: argparse.Namespace, report: Report) -> None:
        self.opts = opts
        self.report = report
        self.levels = opts.levels

    def load_args(self, size: int) -> list[str]:
        o = self.opts
        return ["--concurrency", ",".join(map(str, self.levels)), "--duration", str(o.duration),
                "--warmup", str(o.warmup), "--repeat", str(o.repeat), "--payload", str(size)]

    def timeout(self) -> float:
        o = self.opts
        return 90.0 + len(self.levels) * (o.warmup + o.repeat * o.duration) * 3

    def measure(self, key: str, label: str, module: str, server_args: Sequence[list[str]],
                client_args: list[str], size: int) -> Run:
        """Measure one party; while other processes kept more than --noise-threshold of
        the machine busy, measure again (up to --retry-noisy times) and keep the quietest."""
        best: Run | None = None
        attempts = 1 + max(0, self.opts.retry_noisy)
        for attempt in range(attempts):
            run = self._measure_once(key, label, module, server_args, client_args, size)
            run.attempts = attempt + 1
            if run.note:
                best = best or run
                break
            load = run.other_load()
            best_load = None if best is None else best.other_load()
            if best is None or (load is not None and (best_load is None or load < best_load)):
                best = run
            if load is None or load <= self.opts.noise_threshold or attempt + 1 == attempts:
                break
            progress(f"  other processes used {load:.0%} of the machine; measuring again")
            time.sleep(self.opts.noise_pause)
        assert best is not None
        best.attempts = run.attempts
        self.report.add(best)
        return best

    def _measure_once(self, key: str, label: str, module: str,
                      server_args: Sequence[list[str]], client_args: list[str],
                      size: int) -> Run:
        run = Run(key, label)
        started = time.perf_counter()
        progress(f"{label} ...")
        try:
            with servers(module, server_args, self.opts.backend) as (endpoints, pids):
                results = client(module, ["client", "--endpoint", ",".join(endpoints),
                                          "--server-pids", ",".join(map(str, pids)),
                                          *self.load_args(size), *client_args],
                                 self.opts.backend, self.timeout())
        except PartyError as exc:
            run.note = f"failed: {exc}"
            progress(f"  {run.note}")
            return run
        for r in results:
            run.results[int(r["concurrency"])] = r
        load = run.other_load()
        progress("  " + ", ".join(f"{c} in flight: {r['rate']:,.0f}/s"
                                  for c, r in run.results.items())
                 + f" ({time.perf_counter() - started:.1f}s"
                 + ("" if load is None else f", other load {load:.0%}") + ")")
        return run

    def peer(self, peer: Peer, size: int = 32) -> Run:
        key = f"{peer.key}@{size}"
        missing = [m for m in peer.requires if not module_available(m)]
        if missing:
            return self.report.add(Run(key, peer.label, note=(
                f"skipped: {', '.join(missing)} not installed "
                "(pip install -r benchmarks/requirements.txt)")))
        label = peer.label if size == 32 else f"{peer.label}, {size_label(size)}"
        return self.measure(key, label, peer.module, [[]], [], size)

    def forkcore(self, key: str, label: str, *, transport: str = "tcp", mode: str = "single",
                 size: int = 32, keys: int = 1, servers: int = 1,
                 client_transport_options: dict[str, Any] | None = None) -> Run:
        server_args = [["--transport", transport, "--server-id", f"s{i + 1}"]
                       for i in range(servers)]
        client_args = ["--transport", transport, "--mode", mode, "--keys", str(keys),
                       "--strategy", "consistent_hash"]
        if client_transport_options:
            client_args += ["--client-transport-options", json.dumps(client_transport_options)]
        return self.measure(key, label, FORKCORE, server_args, client_args, size)


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def size_label(size: int) -> str:
    for label, value in SIZES.items():
        if value == size:
            return label
    return f"{size} B"


def progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def plugins_registered(kind: str) -> list[str]:
    try:
        from forkcore.plugins import registry

        return list(registry(kind))
    except Exception:
        return []


def run_scenarios(opts: argparse.Namespace, report: Report) -> None:
    bench = Bench(opts, report)
    scenarios = opts.scenario_set
    transports = plugins_registered("transport")
    strategies = plugins_registered("strategy")
    has_tcp = "tcp" in transports
    peers = [p for p in PEERS if p.key in opts.peer_set]

    def fk(key: str, label: str, **kw: Any) -> None:
        if not has_tcp and kw.get("transport", "tcp") == "tcp":
            report.add(Run(key, label, note="skipped: transport 'tcp' is not installed "
                                            "(pip install ./plugins/transport_tcp)"))
            return
        bench.forkcore(key, label, **kw)

    if "core" in scenarios:
        for peer in peers:
            bench.peer(peer)
        fk("fk-single", "forkcore typed proxy, tcp, single mode")
    if "multi" in scenarios:
        if "consistent_hash" in strategies:
            fk("fk-multi", "forkcore, tcp, multi mode (3 servers, consistent_hash)",
               mode="multi", servers=3)
        else:
            report.add(Run("fk-multi", "forkcore, tcp, multi mode", note=(
                "skipped: strategy 'consistent_hash' is not installed "
                "(pip install ./plugins/strategies)")))
    if "udp" in scenarios:
        if "core" not in scenarios:  # the baseline, measured in the same run
            fk("fk-single", "forkcore typed proxy, tcp, single mode")
        if "udp" in transports:
            fk("fk-udp", "forkcore typed proxy, udp, single mode", transport="udp",
               client_transport_options={"insecure": True})
        else:
            report.add(Run("fk-udp", "forkcore, udp, single mode", note=(
                "skipped: transport 'udp' is not installed (pip install ./plugins/transport_udp)")))
    if "payload" in scenarios:
        coalesced = next((p for p in peers if p.key == "anyio-coalesced"), None)
        for size in opts.payload_sizes:
            if size == 32 and "core" in scenarios:
                continue
            if coalesced is not None:
                bench.peer(coalesced, size)
            fk(f"fk-single@{size}", f"forkcore, tcp, single mode, {size_label(size)}",
               size=size)
    if "grains" in scenarios:
        n = opts.grains
        fk("fk-single-grains", f"forkcore, tcp, single mode, {n:,} grains", keys=n)
        if "consistent_hash" in strategies:
            fk("fk-multi-grains", f"forkcore, tcp, multi mode (3 servers), {n:,} grains",
               mode="multi", servers=3, keys=n)
    if "strategies" in scenarios:
        progress("strategy select() micro-benchmark ...")
        from .strategies import run as run_strategies

        report.strategies = run_strategies(opts.strategy_servers, opts.passes)
        if not report.strategies:
            report.strategy_note = ("no strategy is registered "
                                    "(pip install ./plugins/strategies)")
    if "memory" in scenarios:
        memory(opts, report, has_tcp, strategies)


def memory(opts: argparse.Namespace, report: Report, has_tcp: bool,
           strategies: list[str]) -> None:
    if not has_tcp:
        report.memory_notes.append("skipped: transport 'tcp' is not installed")
        return
    backend = opts.backend
    count = opts.connections
    if strategies:
        strategy = "round_robin" if "round_robin" in strategies else strategies[0]
        for trace in (True, False):
            progress(f"memory per idle client connection ({count} servers, "
                     f"{'tracemalloc' if trace else 'RSS'}) ...")
            try:
                with servers(FORKCORE, [["--count", str(count + 1), "--server-id", "m"]],
                             backend) as (endpoints, _):
                    args = ["connections", "--endpoint", endpoints[0], "--strategy", strategy,
                            "--settle", str(opts.settle)] + (["--trace"] if trace else [])
                    result = client("benchmarks.memory", args, backend, 300)[0]
            except PartyError as exc:
                report.memory_notes.append(f"connections: failed: {exc}")
                break
            merge_memory(report, "connections", result, trace)
    else:
        report.memory_notes.append("connections: skipped: multi mode needs a strategy "
                                   "(pip install ./plugins/strategies)")
    n = opts.activations
    for trace in (True, False):
        progress(f"memory per idle activation ({n:,} grains, "
                 f"{'tracemalloc' if trace else 'RSS'}) ...")
        try:
            with servers(FORKCORE, [["--server-id", "a"] + (["--trace"] if trace else [])],
                         backend) as (endpoints, _):
                result = client("benchmarks.memory", ["activations", "--endpoint", endpoints[0],
                                                      "--count", str(n)], backend, 300)[0]
        except PartyError as exc:
            report.memory_notes.append(f"activations: failed: {exc}")
            break
        merge_memory(report, "activations", result, trace)


def merge_memory(report: Report, what: str, result: dict[str, Any], trace: bool) -> None:
    entry = report.memory.setdefault(what, {"count": result["count"]})
    if trace:
        entry["traced_per"] = result.get("traced_per")
        if "grain_own_per" in result:
            entry["grain_own_per"] = result["grain_own_per"]
        if "healthy" in result:
            entry["healthy"] = result["healthy"]
    else:
        entry["rss_per"] = result.get("rss_per")


# -- the machine --------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def memory_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def source_revision() -> str:
    """The checkout measured: commit, and whether the work tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" with local changes" if dirty.stdout.strip() else "")


def machine(opts: argparse.Namespace) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
        "memory": memory_total(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(), "backend": opts.backend,
        "load_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "packages": versions(), "revision": source_revision(),
        "settings": {"duration": opts.duration, "warmup": opts.warmup, "repeat": opts.repeat,
                     "concurrency": opts.levels},
    }


# -- printing -----------------------------------------------------------------------------


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or not den:
        return "-"
    return f"{num / den:.2f}x"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / KIB:,.2f} KiB" if abs(value) >= KIB else f"{value:,.0f} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          right: Callable[[int], bool] = lambda i: i > 0) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if right(i) else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if right(i) else "-" * w
                            for i, w in enumerate(widths)) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def run_cells(run: Run, concurrency: int) -> list[str]:
    r = run.results.get(concurrency)
    if r is None:
        return ["-", "-", "-", "-", "-", "-"]
    return [fmt_rate(r["rate"]), fmt_us(r["p50_us"]), fmt_us(r["p99_us"]),
            f"±{r['spread'] * 50:.0f}%", fmt_cpu(r.get("client_cpu_us"), r.get("server_cpu_us")),
            "-" if r.get("other_load") is None else f"{r['other_load']:.0%}"]


def fmt_cpu(client_us: float | None, server_us: float | None) -> str:
    if client_us is None:
        return "-"
    return f"{client_us:,.0f} + {'?' if server_us is None else f'{server_us:,.0f}'}"


def render(report: Report, info: dict[str, Any], opts: argparse.Namespace) -> str:
    out: list[str] = []
    w = out.append
    w("# forkcore benchmarks\n")
    w("## Machine\n")
    load = info.get("load_before")
    w(f"- CPU: {info['cpu']}, {info['cores']} cores"
      + (f" ({info['usable_cores']} usable)" if info.get("usable_cores") else "")
      + f", {info['memory']} RAM")
    w(f"- Python: {info['python']}; OS: {info['os']}")
    w(f"- anyio backend: {info['backend']} (forkcore and the raw anyio peers; grpc.aio and "
      "asyncio.Protocol run on asyncio, Pyro5 on threads)")
    w("- packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    w(f"- forkcore source: {info.get('revision', 'unknown')}")
    if load:
        w(f"- load average before / after: {load[0]:.2f} / {info['load_after'][0]:.2f} "
          "(above ~0.5 before means other work shared the 2 cores: expect noise)")
    s = info["settings"]
    w(f"- each cell: median of {s['repeat']} windows of {s['duration']:g}s after "
      f"{s['warmup']:g}s of warm-up; ± is half the spread of the windows' rates; "
      "latencies in µs; CPU µs/call c+s is the CPU time (user + system) of the client "
      "process and of the server process(es) per call; other load is the share of the "
      f"machine other processes used meanwhile (a run above {opts.noise_threshold:.0%} was "
      f"measured again, up to {opts.retry_noisy} times, keeping the quietest)\n")

    levels = opts.levels
    core = [k for k in (f"{p}@32" for p in PEER_KEYS) if k in report.runs]
    if "fk-single" in report.runs:
        core.append("fk-single")
    if core:
        w("## forkcore and its peers (echo of an int and a 32-byte string, one grain)\n")
        rows = []
        for c in levels:
            for key in core:
                run = report.runs[key]
                if run.note:
                    continue
                rate = run.rate(c)
                rows.append([run.label, str(c), *run_cells(run, c),
                             fmt_ratio(rate, report.rate("grpc@32", c)),
                             fmt_ratio(rate, report.rate("anyio-send@32", c)),
                             fmt_ratio(rate, report.rate("anyio-coalesced@32", c))])
        w(table(["party", "in flight", "calls/s", "p50 µs", "p99 µs", "±", "CPU µs/call c+s",
                 "other load", "x grpc.aio", "x anyio one-send", "x anyio coalesced"], rows,
                right=lambda i: i > 0))
        for key in core:
            if report.runs[key].note:
                w(f"\n- {report.runs[key].label}: {report.runs[key].note}")
        w("")

    scenario_rows: list[tuple[str, str, str]] = [
        ("fk-multi", "fk-single", "single mode"),
        ("fk-udp", "fk-single", "tcp single"),
    ]
    for size in opts.payload_sizes:
        if size != 32:
            scenario_rows.append((f"anyio-coalesced@{size}", "", ""))
            scenario_rows.append((f"fk-single@{size}", f"anyio-coalesced@{size}",
                                  f"anyio coalesced, {size_label(size)}"))
    scenario_rows += [("fk-single-grains", "fk-single", "one grain"),
                      ("fk-multi-grains", "fk-single-grains", "single, same grains")]
    present = [(k, b, bl) for k, b, bl in scenario_rows if k in report.runs]
    if present:
        w("## Scenarios\n")
        rows = []
        notes = []
        for c in levels:
            for key, base, base_label in present:
                run = report.runs[key]
                if run.note:
                    continue
                rows.append([run.label, str(c), *run_cells(run, c),
                             base_label or "-",
                             fmt_ratio(run.rate(c), report.rate(base, c)) if base else "-"])
        for key, _, _ in present:
            if report.runs[key].note:
                notes.append(f"- {report.runs[key].label}: {report.runs[key].note}")
        w(table(["scenario", "in flight", "calls/s", "p50 µs", "p99 µs", "±", "CPU µs/call c+s",
                 "other load", "baseline", "x baseline"], rows,
                right=lambda i: i in (1, 2, 3, 4, 5, 6, 7, 9)))
        if notes:
            w("")
            w("\n".join(notes))
        w("")

    if report.strategies or report.strategy_note:
        w("## Strategy select(): µs per call, median (best)\n")
        if report.strategy_note:
            w(f"- {report.strategy_note}\n")
        counts = sorted({r["servers"] for r in report.strategies})
        names: dict[str, str] = {}
        for r in report.strategies:
            names.setdefault(r["strategy"], r["source"])
        rows = []
        for name, source in names.items():
            cells = []
            for n in counts:
                r = next(x for x in report.strategies if x["strategy"] == name
                         and x["servers"] == n)
                cells.append(r.get("error", "")[:40] or
                             f"{r['median_us']:.2f} ({r['best_us']:.2f})")
            rows.append([name, source, *cells])
        w(table(["strategy", "from", *(f"{n:,} servers" for n in counts)], rows,
                right=lambda i: i > 1))
        w("")

    if report.memory or report.memory_notes:
        w("## Memory\n")
        rows = []
        conn = report.memory.get("connections")
        if conn:
            rows.append([f"client, per idle server connection ({conn['count']} servers)",
                         fmt_bytes(conn.get("traced_per")), fmt_bytes(conn.get("rss_per")),
                         "≤ 64 KiB"])
        act = report.memory.get("activations")
        if act:
            rows.append([f"server, per idle activation ({act['count']:,} grains; the grain's "
                         f"own {fmt_bytes(act.get('grain_own_per'))} excluded)",
                         fmt_bytes(act.get("traced_per")), fmt_bytes(act.get("rss_per")),
                         "≤ 2 KiB"])
        if rows:
            w(table(["what", "Python heap (tracemalloc)", "RSS", "target"], rows,
                    right=lambda i: i in (1, 2)))
        for note in report.memory_notes:
            w(f"- memory {note}")
        w("")

    w("## Targets (issue 7; informational)\n")
    for status, text in targets(report, opts):
        w(f"- {status}: {text}")
    for note in report.notes:
        w(f"- note: {note}")
    return "\n".join(out) + "\n"


def targets(report: Report, opts: argparse.Namespace) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def load(key: str, concurrency: int) -> float | None:
        run = report.runs.get(key)
        r = None if run is None else run.results.get(concurrency)
        return None if r is None else r.get("other_load")

    def ratio_target(text: str, num_key: str, den_key: str, concurrency: int, bound: float,
                     at_least: bool = True) -> None:
        num, den = report.rate(num_key, concurrency), report.rate(den_key, concurrency)
        if num is None or not den:
            found.append(("n/a", f"{text}: not measured in this run"))
            return
        value = num / den
        ok = value >= bound if at_least else value <= bound
        loads = [x for x in (load(num_key, concurrency), load(den_key, concurrency))
                 if x is not None]
        noisy = max(loads) if loads else 0.0
        caveat = (f" (unreliable: other processes used {noisy:.0%} of the machine meanwhile)"
                  if noisy > opts.noise_threshold else "")
        found.append(("PASS" if ok else "MISS", f"{text}: {value:.2f}x{caveat}"))

    if 64 in opts.levels:
        ratio_target("typed proxy, tcp single, 64 in flight ≥ 0.6x raw anyio coalesced",
                     "fk-single", "anyio-coalesced@32", 64, 0.6)
        ratio_target("typed proxy, tcp single, 64 in flight > 10x grpc.aio",
                     "fk-single", "grpc@32", 64, 10.0)
    if 1 in opts.levels:
        ratio_target("typed proxy, tcp single, 1 in flight ≥ 0.8x raw anyio one-send",
                     "fk-single", "anyio-send@32", 1, 0.8)
        ratio_target("typed proxy, tcp single, 1 in flight > 3x grpc.aio",
                     "fk-single", "grpc@32", 1, 3.0)
    for c in opts.levels:
        # cost per call = 1/rate: multi's cost over single's = single's rate over multi's
        ratio_target(f"multi mode (3 servers, consistent_hash) cost per call within 10% of "
                     f"single mode, {c} in flight (cost ratio ≤ 1.10)",
                     "fk-single", "fk-multi", c, 1.10, at_least=False)
    if 1 in opts.levels:
        ratio_target("udp ≥ 0.7x tcp, 1 in flight (issue 12)", "fk-udp", "fk-single", 1, 0.7)
    if 64 in opts.levels:
        ratio_target("udp ≥ 0.9x tcp, 64 in flight (issue 12)", "fk-udp", "fk-single", 64,
                     0.9)
    built_in = [r for r in report.strategies if r.get("built_in") and r["servers"] == 100]
    if not built_in:
        found.append(("n/a", "select() ≤ 3 µs per call with 100 servers: not measured"))
    for r in built_in:
        if "error" in r:
            found.append(("MISS", f"select() of {r['strategy']} with 100 servers: {r['error']}"))
            continue
        found.append(("PASS" if r["median_us"] <= 3.0 else "MISS",
                      f"select() of {r['strategy']} ≤ 3 µs with 100 servers: "
                      f"{r['median_us']:.2f} µs"))
    conn = report.memory.get("connections", {}).get("traced_per")
    found.append(("n/a", "≤ 64 KiB client memory per idle connection: not measured")
                 if conn is None else
                 ("PASS" if conn <= 64 * KIB else "MISS",
                  f"≤ 64 KiB client memory per idle connection: {fmt_bytes(conn)}"))
    act = report.memory.get("activations", {}).get("traced_per")
    found.append(("n/a", "≤ 2 KiB server memory per idle activation: not measured")
                 if act is None else
                 ("PASS" if act <= 2 * KIB else "MISS",
                  f"≤ 2 KiB server memory per idle activation: {fmt_bytes(act)}"))
    return found


# -- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else "",
        epilog="Peers: " + ", ".join(PEER_KEYS) + ". Scenarios: " + ", ".join(SCENARIOS) +
        ". Missing peer packages are skipped: pip install -r benchmarks/requirements.txt")
    p.add_argument("--quick", action="store_true",
                   help="short windows, one repetition, smaller scenarios (smoke test, <60s)")
    p.add_argument("--duration", type=float, help="seconds per timed window (default 2)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up (default 1)")
    p.add_argument("--repeat", type=int, help="timed windows per cell (default 3)")
    p.add_argument("--concurrency", default="1,64", help="calls in flight (default 1,64)")
    p.add_argument("--backend", choices=("asyncio", "trio", "uvloop"), default="asyncio")
    p.add_argument("--peers", default="all",
                   help="comma-separated peers to run, 'all' or 'none' (default all)")
    p.add_argument("--scenarios", default="all",
                   help="comma-separated scenarios, or 'all' (default all)")
    p.add_argument("--payloads", default="32,4096,262144",
                   help="payload sizes in bytes for the payload scenario")
    p.add_argument("--grains", type=int, default=10_000,
                   help="distinct grains in the grains scenario (default 10000)")
    p.add_argument("--strategy-servers", default="10,100,1000",
                   help="server counts for the strategy micro-benchmark")
    p.add_argument("--passes", type=int, help="strategy passes of 1000 calls (default 15)")
    p.add_argument("--connections", type=int,
                   help="idle connections in the memory scenario (default 100)")
    p.add_argument("--activations", type=int,
                   help="idle activations in the memory scenario (default 10000)")
    p.add_argument("--settle", type=float, help="seconds idle before memory readings")
    p.add_argument("--retry-noisy", type=int,
                   help="measure a party again when other processes were busy (default 2; "
                        "0 with --quick)")
    p.add_argument("--noise-threshold", type=float, default=0.15,
                   help="share of the machine other processes may use before a run is "
                        "measured again (default 0.15)")
    p.add_argument("--noise-pause", type=float, default=5.0,
                   help="seconds to wait before measuring a noisy run again (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON to FILE")
    opts = p.parse_args(argv)
    quick = opts.quick
    defaults = {"duration": (0.25, 2.0), "warmup": (0.15, 1.0), "repeat": (2, 3),
                "passes": (3, 15), "connections": (20, 100), "activations": (2000, 10_000),
                "settle": (0.5, 1.5), "retry_noisy": (0, 2)}
    for name, (q, full) in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, q if quick else full)
    try:
        opts.levels = [int(x) for x in opts.concurrency.split(",") if x.strip()]
        opts.payload_sizes = [int(x) for x in opts.payloads.split(",") if x.strip()]
        opts.strategy_servers = [int(x) for x in opts.strategy_servers.split(",") if x.strip()]
    except ValueError as exc:
        p.error(str(exc))
    if opts.peers == "all":
        opts.peer_set = set(PEER_KEYS)
    elif opts.peers == "none":
        opts.peer_set = set()
    else:
        opts.peer_set = {x.strip() for x in opts.peers.split(",") if x.strip()}
        unknown = opts.peer_set - set(PEER_KEYS)
        if unknown:
            p.error(f"unknown peers {', '.join(sorted(unknown))}; choose from "
                    f"{', '.join(PEER_KEYS)}")
    opts.scenario_set = set(SCENARIOS) if opts.scenarios == "all" else {
        x.strip() for x in opts.scenarios.split(",") if x.strip()}
    unknown = opts.scenario_set - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {', '.join(sorted(unknown))}; choose from "
                f"{', '.join(SCENARIOS)}")
    if opts.backend == "uvloop" and not module_available("uvloop"):
        p.error("--backend uvloop needs uvloop installed (pip install uvloop)")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.perf_counter()
    info = machine(opts)
    report = Report()
    if opts.backend == "trio":
        report.notes.append("the asyncio.Protocol and grpc.aio peers run on asyncio whatever "
                            "the backend")
    run_scenarios(opts, report)
    info["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["seconds"] = time.perf_counter() - started
    text = render(report, info, opts)
    sys.stdout.write(text)
    sys.stdout.write(f"\n(measured in {info['seconds']:.0f}s)\n")
    if opts.json:
        Path(opts.json).write_text(json.dumps({
            "machine": info,
            "runs": {k: {"label": r.label, "note": r.note,
                         "results": {str(c): v for c, v in r.results.items()}}
                     for k, r in report.runs.items()},
            "strategies": report.strategies, "memory": report.memory,
            "targets": targets(report, opts)}, indent=2), encoding="utf-8")
    return 0
