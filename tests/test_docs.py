"""The documentation runs: every ```python block of README.md and docs/*.md runs, every
```toml block is valid (and a forkcore configuration, if it looks like one), and the
configuration reference is what docs/gen_config_reference.py generates.

Each block runs on its own, in a fresh interpreter, in a temporary directory, with the
repository root and tests/ on PYTHONPATH. A block that is not meant to run on its own
must use another fence (```text, ```pycon, ...). Tutorials that build files step by step
name them in a first-line comment:

- `# mygrains.py`: a module. It is checked by importing it (so its
  `if __name__ == "__main__":` part does not run), and it is saved under that name for
  every later block of the same document, which may import it;
- `# test_mygrains.py` (or `# tests/test_mygrains.py`): a test module, run with pytest,
  so example tests really pass.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import attrs
import pytest

import forkcore
from forkcore import config

ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = ROOT / "tests"
PYTHON = {"python", "py", "python3"}
TIMEOUT = 60.0
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
FILE_NAME = re.compile(r"^#\s*(?:[\w.-]*/)*(?P<name>\w+)\.py\s*$")


@attrs.frozen
class Block:
    path: Path
    line: int  # 1-based line of the block's first line of code
    lang: str
    code: str

    @property
    def file_name(self) -> str | None:
        """The module name a first-line comment gives the block (`# name.py`), if any."""
        m = FILE_NAME.match(self.code.lstrip("\n").split("\n", 1)[0])
        return None if m is None else m["name"]

    @property
    def where(self) -> str:
        """`file:line` of the opening fence."""
        return f"{self.path.relative_to(ROOT)}:{self.line - 1}"


def blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a markdown file (of `text`, if given)."""
    found: list[Block] = []
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        lang = (m["info"].split() or [""])[0].lower()
        start = i + 1
        j = start
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) \
                    and not close["info"].strip():
                break
            j += 1
        else:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[start:j]]
        found.append(Block(path, start + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return found


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks() -> list[Block]:
    return [b for doc in documents() for b in blocks(doc) if b.lang in PYTHON]


def block_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FORKCORE_DISABLE_PLUGIN_AUTOLOAD", None)  # as a user's environment is
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def failing_line(block: Block, script: Path, output: str) -> str:
    """`file:line` of the innermost traceback frame inside the block, if any."""
    lines = re.findall(rf'File "{re.escape(str(script))}", line (\d+)', output)
    if not lines:
        return block.where
    return f"{block.path.relative_to(ROOT)}:{lines[-1]}"


def write(block: Block, directory: Path, name: str) -> Path:
    """The block as `directory/name.py`, padded with blank lines so that line numbers in
    tracebacks are the document's own."""
    path = directory / f"{name}.py"
    path.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
    return path


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.where)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    for earlier in blocks(block.path):  # the modules an earlier block of the tutorial saved
        if earlier.line >= block.line:
            break
        name = earlier.file_name
        if earlier.lang in PYTHON and name is not None and not name.startswith("test_"):
            write(earlier, tmp_path, name)
    name = block.file_name
    stem = re.sub(r"\W", "_", str(block.path.relative_to(ROOT)))
    script = write(block, tmp_path, name or f"{stem}_{block.line - 1}")
    if name is None:
        command = [sys.executable, str(script)]
    elif name.startswith("test_"):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    else:
        command = [sys.executable, "-c", f"import {name}"]
    try:
        proc = subprocess.run(command, cwd=tmp_path, env=block_env(), capture_output=True,
                              text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.where}: the ```{block.lang} block here did not finish "
                    f"within {TIMEOUT:g}s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        pytest.fail(f"{failing_line(block, script, output)}: the ```{block.lang} block "
                    f"at {block.where} failed (exit {proc.returncode}; a block that "
                    "is not meant to run on its own needs another fence, e.g. ```text)\n"
                    f"{output[-6000:]}", pytrace=False)


def toml_blocks() -> list[Block]:
    return [b for doc in documents() for b in blocks(doc) if b.lang == "toml"]


@pytest.mark.parametrize("block", toml_blocks(), ids=lambda b: b.where)
def test_toml_block_is_valid(block: Block) -> None:
    """Every ```toml block parses; a forkcore configuration (only [client] and [server]
    tables) also passes `forkcore.load_config`, so renamed or mistyped keys show up."""
    try:
        data = tomllib.loads(block.code)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{block.where}: not valid TOML: {exc}", pytrace=False)
    if data and set(data) <= {"client", "server"}:
        try:
            forkcore.load_config(data)
        except forkcore.errors.ConfigError as exc:
            pytest.fail(f"{block.where}: not a valid forkcore configuration: {exc}",
                        pytrace=False)


def test_the_readme_and_new_docs_have_python_blocks() -> None:
    """Guards the extraction: if it finds nothing, nothing is tested."""
    by_file = {b.path.name for b in python_blocks()}
    assert {"README.md", "getting-started.md", "concepts.md", "configuration.md",
            "operations.md", "plugins.md"} <= by_file


def test_block_extraction() -> None:
    text = ("intro\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  y = 2\n  ```\n"
            "````text\n```python\nnot a block\n```\n````\n~~~py\nz = 3\n~~~\n")
    path = ROOT / "docs" / "_extraction_example.md"
    found = [(b.line, b.lang, b.code) for b in blocks(path, text)]
    assert found == [(3, "python", "x = 1\n"), (9, "python", "y = 2\n"),
                     (12, "text", "```python\nnot a block\n```\n"), (17, "py", "z = 3\n")]


# -- the configuration reference ---------------------------------------------------------


def generator() -> ModuleType:
    path = ROOT / "docs" / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date() -> None:
    gen = generator()
    expected = gen.render()
    current = gen.OUTPUT.read_text(encoding="utf-8") if gen.OUTPUT.exists() else ""
    assert current == expected, (
        "docs/configuration.md does not match the options declared in forkcore/config.py: "
        "run `python docs/gen_config_reference.py` and commit the result")


def test_configuration_reference_covers_every_option() -> None:
    gen = generator()
    text = gen.render()
    for name, cls in gen.sections():
        assert f"## `[{name}]`" in text
        for field in attrs.fields(cls):
            assert f"| `{field.name}` |" in text, f"[{name}] {field.name}"
    assert {cls for _, cls in gen.sections()} >= {
        config.ClientOptions, config.HealthOptions, config.SecurityOptions,
        config.ServerOptions}


def test_configuration_reference_example_is_the_defaults() -> None:
    """The generated file of defaults loads, and loads to exactly the defaults."""
    gen = generator()
    loaded = forkcore.load_config(tomllib.loads(gen.example_toml()))
    assert loaded.client == config.ClientOptions(
        servers=gen.EXAMPLE_VALUES[config.ClientOptions, "servers"])
    assert loaded.server == config.ServerOptions(
        id=gen.EXAMPLE_VALUES[config.ServerOptions, "id"])
