"""The documentation cannot drift from the code: the generated reference pages are
current, every command, option and setting has a text to show, the README lists
every command and its links lead somewhere, and the site builds offline."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = "run `python docs/gen.py` and commit what it writes"


def _gen():
    spec = importlib.util.spec_from_file_location("docs_gen", ROOT / "docs" / "gen.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _gen()


def test_every_command_option_and_setting_has_a_text() -> None:
    problems = gen.undocumented_cli() + gen.undocumented_settings()
    assert not problems, "\n".join(problems)


def test_no_raiox_variable_is_read_behind_the_resolvers_back() -> None:
    unknown = gen.unknown_variables()
    assert not unknown, "\n".join(unknown)


@pytest.mark.slow
def test_generated_pages_are_current() -> None:
    stale = gen.stale()
    assert not stale, f"stale generated docs: {', '.join(stale)}; {FIX}"


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short_and_lists_every_command() -> None:
    text = _readme()
    assert len(text.splitlines()) <= 200, "README.md over 200 lines: move it into docs/"
    commands = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    missing = [
        " ".join(path)
        for path, _ in gen.commands()
        if len(path) == 1 and f"`raiox {path[0]}" not in commands
    ]
    assert not missing, f"README's Commands lacks a line for: {', '.join(missing)}"


def _slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
    return explicit.group(1) if explicit else slugify(heading, "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_links_lead_to_pages_and_headings_that_exist() -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _readme()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path
        if not page.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(page):
            broken.append(f"{target}: no such heading")
    assert not broken, "\n".join(broken)


# A page that loads anything from another host does not work offline, nor behind a
# clinic's strict proxy: scripts, styles, fonts, images, frames.
EXTERNAL_ASSET = re.compile(
    r"<(?:script|img|iframe|source|embed)\b[^>]*\bsrc=[\"']?(?:https?:)?//"
    r"|<link\b[^>]*\bhref=[\"']?(?:https?:)?//"
    r"|url\(\s*[\"']?(?:https?:)?//"
    r"|@import\s+[\"']?(?:url\()?[\"']?(?:https?:)?//",
    re.I,
)


@pytest.mark.slow
def test_site_builds_strict_and_loads_nothing_from_outside(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert build.returncode == 0, build.stderr
    assert (site / "reference" / "cli.html").exists()
    found = []
    for page in sorted(site.rglob("*")):
        if page.suffix in {".html", ".css"}:
            for match in EXTERNAL_ASSET.finditer(page.read_text(encoding="utf-8")):
                found.append(f"{page.relative_to(site)}: {match.group(0)}")
    assert not found, "\n".join(found)
