"""Every ```bash and ```python block of README.md and docs/ runs here, or is marked as not run.

A block is run unless the line just before its opening fence is one of these comments:

- ``<!-- illustration: why -->``: shown, not run (it needs a GPU, a cluster, packages the test
  environment lacks, or stands for the reader's own code);
- ``<!-- test-command -->``: the README's test command, which .ci/run itself runs.

Three more comments change how a block runs: ``<!-- run twice: why -->`` runs it a second time
in the same folder (a block that promises to resume when run again),
``<!-- test-env NAME=VALUE ... -->`` sets environment variables for it (fake GPUs), and
``<!-- needs MODULE ... -->`` skips the rest of its page where a module it imports is not
installed (an experiment tracker).

The blocks of one page run in order, in one temporary folder that holds a copy of examples/, so
a page may use what an earlier block wrote (``hyperfleet status runs/...`` after a search).
Budgets are cut to keep the test fast: ``--n-trials N`` and ``n_trials=N`` become 2.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = ("bash", "python")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
COMMENT = re.compile(
    r"^\s*<!--\s*(?P<kind>illustration|test-command|run twice|test-env|needs)\b(?P<rest>.*?)-->\s*$"
)
SMALL_TRIALS = 2


@dataclass
class Snippet:
    page: Path
    line: int
    lang: str
    code: str
    marker: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    twice: bool = False
    needs: tuple[str, ...] = ()

    @property
    def runs(self) -> bool:
        return self.marker not in ("illustration", "test-command")

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippets(page: Path) -> list[Snippet]:
    lines = page.read_text().splitlines()
    found: list[Snippet] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, lang = opening["indent"], opening["lang"]
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if lang in LANGUAGES:
            body = [
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[index + 1 : end]
            ]
            snippet = Snippet(page, index + 1, lang, "\n".join(body) + "\n")
            comment = COMMENT.match(lines[index - 1]) if index > 0 else None
            if comment is not None:
                kind = comment["kind"]
                if kind == "test-env":
                    snippet.env = dict(item.split("=", 1) for item in comment["rest"].split())
                elif kind == "run twice":
                    snippet.twice = True
                elif kind == "needs":
                    snippet.needs = tuple(comment["rest"].split())
                else:
                    snippet.marker = kind
            found.append(snippet)
        index = end + 1
    return found


def with_small_budgets(code: str) -> str:
    code = re.sub(r"--n-trials \d+", f"--n-trials {SMALL_TRIALS}", code)
    return re.sub(r"\bn_trials=\d+", f"n_trials={SMALL_TRIALS}", code)


def run(snippet: Snippet, folder: Path, number: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERFLEET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(snippet.env)
    code = with_small_budgets(snippet.code)
    if snippet.lang == "python":
        named = re.match(r"# (\w+\.py)\n", code)
        script = folder / (named[1] if named else f"snippet_{number}.py")
        script.write_text(code)
        command = [sys.executable, script.name]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    for attempt in range(2 if snippet.twice else 1):
        done = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, (
            f"{snippet.where()} (run {attempt + 1}) exited with {done.returncode}:\n"
            f"{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )


def installed(module: str) -> bool:
    if module in sys.modules:  # find_spec refuses a module imported without a spec
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


PAGES = [page for page in doc_pages() if any(s.runs for s in snippets(page))]


def test_the_markers_are_known_and_some_blocks_run() -> None:
    every = [s for page in doc_pages() for s in snippets(page)]
    assert sum(s.runs for s in every) >= 5, "almost nothing in the docs is tested"
    readme = snippets(ROOT / "README.md")
    assert [s.marker for s in readme].count("test-command") == 1
    for page in doc_pages():
        for number, line in enumerate(page.read_text().splitlines()):
            if line.strip().startswith("<!--") and re.search(
                r"illustrat|run twice|test-env|needs", line
            ):
                assert COMMENT.match(line), f"{page.relative_to(ROOT)}:{number + 1}: {line.strip()}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_the_blocks_of_a_page_run(page: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    for number, snippet in enumerate(snippets(page)):
        missing = [name for name in snippet.needs if not installed(name)]
        if missing:
            pytest.skip(f"{snippet.where()} needs {', '.join(missing)}, which is not installed")
        if snippet.runs:
            run(snippet, tmp_path, number)
