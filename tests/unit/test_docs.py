"""The documentation says what the code does: generated parts are current, every option
is documented with its real default, every link resolves, and every `python -m` module
and `make` target the docs name exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from streamasr.core.decoding import DecoderConfig, EndpointConfig, results_schema_doc

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: The one page that documents the options (tests/unit/test_decoding_config.py checks its ranges).
CONFIGURATION = ROOT / "docs" / "configuration.md"
#: The README is the front door: what it is, the commands, the picture, links (issue 23).
README_MAX_LINES = 150
#: Every hand-written page a reader reaches from the README; the run reports under
#: benchmarks/results/ are written by `make bench` and link nowhere.
PAGES = sorted(
    [README, ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
    + [ROOT / "benchmarks" / "README.md", *(ROOT / "benchmarks" / "results").glob("**/README.md")]
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_results_doc_is_the_decoders_own():
    assert (ROOT / "docs" / "results.md").read_text() == results_schema_doc, (
        "regenerate docs/results.md from streamasr.core.decoding.results_schema_doc"
    )


@pytest.mark.parametrize(
    "field",
    dataclasses.fields(DecoderConfig) + dataclasses.fields(EndpointConfig),
    ids=lambda f: f.name,
)
def test_every_option_is_documented_with_its_default(field):
    doc = CONFIGURATION.read_text()
    rows = [
        line
        for line in doc.splitlines()
        if line.startswith("|") and f"`{field.name}`" in line.split("|")[1]
    ]
    assert rows, f"option {field.name} is not documented in {page_id(CONFIGURATION)}"
    default = field.default
    if isinstance(default, bool):
        shown = str(default).lower()
    elif default in ((), ""):
        shown = "none"
    else:
        shown = str(default)
    assert shown in rows[0].split("|")[2], (
        f"{page_id(CONFIGURATION)} shows a wrong default for {field.name}: {rows[0]}"
    )


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("\n\n")[:3]
    assert any("make demo" in part and "make test" in part for part in head)


def test_readme_says_what_ci_runs():
    """The README's `make test` line names .ci/run's commands, in .ci/run's order."""
    ci = [
        line.strip()
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.startswith("make ")
    ]
    assert "make test-image" in ci, "an image that cannot start must fail CI"
    test_line = next(
        line for line in README.read_text().splitlines() if line.startswith("make test ")
    )
    said = re.findall(r"`(make [a-z-]+)`", test_line)
    assert [c for c in ci if c != "make test"] == said


def test_readme_is_a_front_door_that_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(text.splitlines())} lines: measurements belong in docs/ "
        "and the history in CHANGELOG.md"
    )
    linked = {Path(target.split("#")[0]).name for target in LINK.findall(text)}
    unlinked = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name not in linked)
    assert unlinked == [], f"README.md does not link docs/{unlinked}"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-`/`_` dropped,
    spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file (outside code blocks); a repeated
    heading gets GitHub's -1, -2, ... suffixes."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(
                f"{target}: no {dest.relative_to(ROOT) if ROOT in dest.parents else dest}"
            )
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {page_id(dest)}")
    assert broken == [], f"{page_id(page)}: broken links {broken}"


def code_in(path: Path) -> str:
    """The page's code: fenced blocks and inline code spans (prose is not a command)."""
    text = path.read_text()
    return "\n".join(FENCE.findall(text) + CODE_SPAN.findall(FENCE.sub("", text)))


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=page_id)
def test_every_python_module_named_exists(page, monkeypatch):
    """`python -m X` in the README and docs: X imports from a checkout (benchmarks and
    training are run from one) and, for a package, has a __main__."""
    monkeypatch.syspath_prepend(str(ROOT))
    modules = sorted(set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", code_in(page))))
    missing = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{name}.__main__")
        if spec is None:
            missing.append(name)
    assert missing == [], f"{page_id(page)} names modules that do not run: {missing}"


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("page", DOCS, ids=page_id)
def test_every_make_target_named_exists(page):
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", code_in(page)))
    if page == README:
        assert {"demo", "test"} <= named, "the README's commands were not found"
    missing = sorted(named - makefile_targets())
    assert missing == [], f"{page_id(page)} names make targets the Makefile lacks: {missing}"


def test_the_contract_example_runs_as_written():
    """docs/protocol.md's validation command, run as the page writes it."""
    import shlex
    import subprocess
    import sys

    lines = [
        line.split("#")[0].strip()
        for block in FENCE.findall((ROOT / "docs" / "protocol.md").read_text())
        for line in block.splitlines()
        if "-m streamasr.protocol.contract" in line
    ]
    assert lines, "docs/protocol.md no longer shows how to validate a model"
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/python", line
        r = subprocess.run(
            [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and r.stdout.startswith("OK: "), (line, r.stdout, r.stderr)


def test_every_transcribe_flag_is_documented(capsys):
    """docs/configuration.md's flag table and `transcribe --help`, both ways."""
    from streamasr_client.transcribe import build_parser

    build_parser().print_help()
    flags = {w.strip(",[]").split("=")[0] for w in capsys.readouterr().out.split()}
    flags = {f for f in flags if f.startswith("--")} - {"--help"}
    section = CONFIGURATION.read_text().split("## The `transcribe` CLI", 1)[1]
    documented = {
        flag
        for line in section.splitlines()
        if line.startswith("| `")
        for flag in re.findall(r"`(--[\w-]+)[^`]*`", line.split("|")[1])
    }
    assert flags, "no flags parsed from transcribe --help"
    assert flags == documented, (
        f"undocumented: {sorted(flags - documented)}, gone: {sorted(documented - flags)}"
    )


#: Folders the docs name that a command creates (`make bench-gpu` writes its results here).
CREATED_BY_COMMANDS = {"benchmarks/results/gpu"}
REPO_PATH = re.compile(
    r"`((?:streamasr|client|tests|benchmarks|backends|docker|training|model_repository|assets)"
    r"/[\w./-]*)`"
)


@pytest.mark.parametrize("page", DOCS, ids=page_id)
def test_every_repository_path_named_exists(page):
    """A file or folder named as code (`streamasr/core/state.py`) is where the page says:
    a moved module takes its docs along."""
    named = {p.rstrip("/") for p in REPO_PATH.findall(page.read_text()) if "<" not in p}
    missing = sorted(p for p in named - CREATED_BY_COMMANDS if not (ROOT / p).exists())
    assert missing == [], f"{page_id(page)} names paths that are not there: {missing}"
