"""The documentation says what the code does: generated parts are current, every option
is documented with its real default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from streamasr.core.decoding import DecoderConfig, EndpointConfig, results_schema_doc

ROOT = Path(__file__).resolve().parents[2]


def test_results_doc_is_the_decoders_own():
    assert (ROOT / "docs" / "results.md").read_text() == results_schema_doc, (
        "regenerate docs/results.md from streamasr.core.decoding.results_schema_doc"
    )


@pytest.mark.parametrize(
    "field",
    dataclasses.fields(DecoderConfig) + dataclasses.fields(EndpointConfig),
    ids=lambda f: f.name,
)
def test_every_option_is_in_the_readme_with_its_default(field):
    readme = (ROOT / "README.md").read_text()
    rows = [
        line
        for line in readme.splitlines()
        if line.startswith("|") and f"`{field.name}`" in line.split("|")[1]
    ]
    assert rows, f"option {field.name} is not documented in README.md"
    default = field.default
    if isinstance(default, bool):
        shown = str(default).lower()
    elif default in ((), ""):
        shown = "none"
    else:
        shown = str(default)
    assert shown in rows[0].split("|")[2], (
        f"README shows a wrong default for {field.name}: {rows[0]}"
    )


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n\n")[:3]
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
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("make test ")
    )
    said = re.findall(r"`(make [a-z-]+)`", test_line)
    assert [c for c in ci if c != "make test"] == said
