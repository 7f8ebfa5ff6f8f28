"""A third-party plugin distribution, installed for real and selected from a configuration
file: examples/custom_strategy (`forkcore-example-strategy`, strategy
`weighted_rendezvous`).

The distribution is built from a copy of its folder (the checkout stays clean) and
installed with pip into the interpreter running the tests, offline and without its
dependencies (forkcore is already there); it is reinstalled only when the installed copy
differs from the source. Everything that must see the new entry point runs in a fresh
subprocess, since this process's plugin manager has already read the entry points.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_strategy"
DIST = "forkcore-example-strategy"
PACKAGE = "forkcore_example_strategy"
STRATEGY = "weighted_rendezvous"
ENTRY_POINT = ("forkcore", "example", f"{PACKAGE}.plugin")
TIMEOUT = 60.0  # seconds any one subprocess may take

pytestmark = pytest.mark.skipif(not EXAMPLE.is_dir(), reason="no examples/custom_strategy")


def run(*args: str | Path, cwd: Path, timeout: float = TIMEOUT,
        **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("FORKCORE_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env={**environ, **env},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


# -- building and installing the example -------------------------------------------------


def source_files() -> dict[str, bytes]:
    package = EXAMPLE / PACKAGE
    return {p.relative_to(package).as_posix(): p.read_bytes()
            for p in sorted(package.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def installed_copy_is_current() -> bool:
    """The example is installed, with our entry point, version and package files."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    version = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["version"]
    if dist.version != version or ENTRY_POINT not in {
            (ep.group, ep.name, ep.value) for ep in dist.entry_points}:
        return False
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return False
    installed = Path(next(iter(spec.submodule_search_locations)))
    return all((installed / name).is_file() and (installed / name).read_bytes() == data
               for name, data in source_files().items())


def setuptools_builds_wheels() -> bool:
    """Whether setuptools here can build a wheel by itself: it needs the `wheel` package
    before 70.1 (and a fresh Python 3.11 venv has setuptools 65 without it)."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    major, minor = (int(n) for n in re.findall(r"\d+", importlib.metadata.version(
        "setuptools"))[:2])
    return (major, minor) >= (70, 1)


def requires_dist(requires_txt: str) -> list[str]:
    """egg-info's requires.txt as the wheel's `Requires-Dist` values."""
    lines: list[str] = []
    extra = marker = ""
    for line in (raw.strip() for raw in requires_txt.splitlines()):
        if line.startswith("["):
            extra, _, marker = line.strip("[]").partition(":")
        elif line:
            conditions = [f"({marker})"] * bool(marker) + [f'extra == "{extra}"'] * bool(extra)
            lines.append(line + (f"; {' and '.join(conditions)}" if conditions else ""))
    return lines


def digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pack_wheel(source: Path, out: Path) -> Path:
    """A pure-Python wheel from setuptools' own reading of pyproject.toml (`egg_info`),
    packed the way `bdist_wheel` packs it, for setuptools that cannot build wheels here."""
    egg_base = out / "egg-info"
    egg_base.mkdir(parents=True)
    checked(run(sys.executable, "-c", "from setuptools import setup; setup()", "egg_info",
                "--egg-base", egg_base, cwd=source))
    [info] = egg_base.glob("*.egg-info")
    pkg_info = (info / "PKG-INFO").read_text(encoding="utf-8")
    headers, _, body = pkg_info.partition("\n\n")
    fields = dict(line.split(": ", 1) for line in headers.splitlines() if ": " in line)
    requires = info / "requires.txt"
    if "Requires-Dist" not in fields and requires.exists():
        headers += "".join(f"\nRequires-Dist: {r}" for r in requires_dist(requires.read_text()))
    name = re.sub(r"[-_.]+", "_", fields["Name"]).lower()
    dist_info = f"{name}-{fields['Version']}.dist-info"
    files: dict[str, bytes] = {}
    for top in (info / "top_level.txt").read_text().split():
        for path in sorted((source / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(source).as_posix()] = path.read_bytes()
    files[f"{dist_info}/METADATA"] = f"{headers}\n\n{body}".encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: forkcore-tests\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    for extra in ("entry_points.txt", "top_level.txt"):
        if (info / extra).exists():
            files[f"{dist_info}/{extra}"] = (info / extra).read_bytes()
    record = [f"{member},sha256={digest(data)},{len(data)}" for member, data in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,", ""]).encode()
    wheel = out / f"{name}-{fields['Version']}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return wheel


def build_wheel(tmp: Path) -> Path:
    source = tmp / "source"  # a copy, so no build/ or *.egg-info lands in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(EXAMPLE / name, source / name)
    shutil.copytree(EXAMPLE / PACKAGE, source / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp / "dist"
    out.mkdir()
    if not setuptools_builds_wheels():
        return pack_wheel(source, out)
    checked(run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "--disable-pip-version-check", "--quiet", "--wheel-dir", out,
                source, cwd=tmp))
    [wheel] = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The example distribution, installed in this interpreter's environment."""
    if installed_copy_is_current():
        return
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment, so the example "
                    "plugin cannot be built offline; `pip install setuptools` to run this")
    tmp = tmp_path_factory.mktemp("example-build")
    wheel = build_wheel(tmp)
    checked(run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                "--force-reinstall", "--disable-pip-version-check", "--quiet", wheel,
                cwd=tmp))
    assert installed_copy_is_current(), "the example was installed but is not importable"


# -- in a fresh process: configuration file → plugin → routing ---------------------------

ROUTE_SCRIPT = r"""
import importlib.metadata, json, sys
import anyio
import forkcore
from forkcore.plugins import registrations, registry

class IWhere(forkcore.GrainInterface, name="third_party.where"):
    async def where(self) -> str: ...

def located(server_id):
    async def where(self) -> str:
        return server_id
    return type(f"Where_{server_id}", (forkcore.Grain, IWhere), {"where": where})

async def host(server_id, endpoint, metadata, stop, *, task_status):
    async with forkcore.Server(id=server_id, listen=endpoint, transport="memory",
                               grains=[located(server_id)], metadata=metadata):
        task_status.started()
        await stop.wait()

async def main(config, servers, keys):
    client = forkcore.Client.from_config(config)  # resolves the strategy by name now
    options = forkcore.load_config(config).client.strategy_options
    [reg] = [r for r in registrations("strategy") if r.name == "weighted_rendezvous"]
    out = {"strategy": f"{type(client.strategy).__module__}.{type(client.strategy).__name__}",
           "source": reg.source,
           "module": importlib.import_module(type(client.strategy).__module__).__file__}
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        for server_id, (endpoint, metadata) in servers.items():
            await tg.start(host, server_id, endpoint, metadata, stop)
        async with client:
            views = list(client.servers)
            out["metadata"] = {v.id: dict(v.metadata) for v in views}
            out["routed"] = [client.route(IWhere, k) for k in range(keys)]
            out["landed"] = [await client.get_grain(IWhere, k).where() for k in range(keys)]
            out["again"] = [await client.call("third_party.where", k, "where")
                            for k in range(keys)]
            # a second strategy from the same factory and options, servers in another order
            fresh = registry("strategy")["weighted_rendezvous"](**options)
            out["fresh"] = [fresh.select(forkcore.GrainId("third_party.where", k), views[::-1])
                            for k in range(keys)]
        stop.set()
    print(json.dumps(out))

anyio.run(main, sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]),
          backend=sys.argv[4])
"""

# server id → (memory endpoint, metadata the server announces)
SERVERS = {
    "s1": ("s1.example:1", {"weight": 1}),
    "s2": ("s2.example:2", {"weight": 3, "zone": "eu"}),
    "s3": ("s3.example:3", {}),  # no weight: default_weight, which the file sets to 2
    "s4": ("s4.example:4", {"weight": 5}),  # drained by the file's `weights`
}
CLIENT_TOML = """\
[client]
mode = "multi"
transport = "memory"
servers = [{servers}]
strategy = "weighted_rendezvous"
request_timeout = 10.0

[client.strategy_options]
default_weight = 2
weights = {{ s4 = 0 }}
"""
KEYS = 600


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory to run subprocesses in, so only installed code is importable."""
    path = tmp_path / "run"
    path.mkdir()
    return path


def write_client_config(workdir: Path) -> Path:
    config = workdir / "client.toml"
    config.write_text(CLIENT_TOML.format(
        servers=", ".join(json.dumps(endpoint) for endpoint, _ in SERVERS.values())))
    return config


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_strategy_from_a_config_file_routes_calls(workdir: Path, backend: str) -> None:
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        pytest.skip("trio is not installed")
    config = write_client_config(workdir)
    result = checked(run(sys.executable, "-c", ROUTE_SCRIPT, config, json.dumps(SERVERS),
                         str(KEYS), backend, cwd=workdir))
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])

    # the installed distribution provided the strategy the file names
    assert out["strategy"] == f"{PACKAGE}.strategy.WeightedRendezvous"
    assert out["source"] == DIST
    assert not Path(out["module"]).is_relative_to(workdir)
    assert out["metadata"] == {sid: metadata for sid, (_, metadata) in SERVERS.items()}

    # every call landed where the client said it would, and where the strategy says
    assert out["landed"] == out["routed"] == out["again"] == out["fresh"]

    # ... which follows the weights: announced (s1, s2), the file's default (s3), and the
    # file's `weights` overriding an announced one (s4 drained)
    tally = Counter(out["landed"])
    assert "s4" not in tally, tally
    for server_id, weight in (("s1", 1), ("s2", 3), ("s3", 2)):
        assert tally[server_id] / KEYS == pytest.approx(weight / 6, abs=0.06), tally


@pytest.mark.usefixtures("installed")
def test_bad_strategy_option_in_a_file_is_a_one_line_error(workdir: Path) -> None:
    config = write_client_config(workdir)
    config.write_text(config.read_text().replace("weights = ", "wieghts = "))
    result = run(sys.executable, "-m", "forkcore.cli", "call", "-c", config,
                 "third_party.where", "1", "where", cwd=workdir)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert str(config) in line or "client.toml" in line, line
    assert "strategy_options" in line and "'wieghts'" in line, line
    assert "default_weight, metadata_key, weights" in line, line


@pytest.mark.usefixtures("installed")
def test_forkcore_plugins_lists_the_strategy_and_its_distribution(workdir: Path) -> None:
    script = Path(sys.executable).with_name("forkcore")
    command = [script] if script.exists() else [sys.executable, "-m", "forkcore.cli"]
    result = checked(run(*command, "plugins", cwd=workdir))
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["strategy", STRATEGY, DIST] in rows, result.stdout
    assert ["transport", "memory", "forkcore"] in rows, result.stdout


def test_the_example_passes_its_own_tests() -> None:
    """examples/custom_strategy/tests, as its author runs them (from its folder, against its
    source, through forkcore's pytest plugin), whether or not the example is installed."""
    result = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=EXAMPLE)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert re.search(r"\b\d+ passed\b", result.stdout), result.stdout
