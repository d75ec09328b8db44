"""The docs stay in step with the code: every config key and exit code is documented, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import recipe_rows, reference_rows, source_rows, task_rows
from pipeline.runner import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, EXIT_STAGE_FAILED

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIG_DOC = (ROOT / "docs" / "config.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_config_key_is_in_the_reference_with_its_default():
    missing = [key for key, _, _ in reference_rows() if f"| `{key}` |" not in CONFIG_DOC]
    assert not missing, f"docs/config.md lacks: {missing}"
    stale = [f"{key} = {default}" for key, default, _ in reference_rows() if f"| `{key}` | `{default}` |" not in CONFIG_DOC]
    assert not stale, f"docs/config.md has other defaults than the code for: {stale}"
    assert "(docs/config.md)" in README, "the README must link the config reference"


def test_every_tasks_recipe_is_in_the_reference_as_declared():
    stale = [row[0] for row in recipe_rows() if "| " + " | ".join(row) + " |" not in CONFIG_DOC]
    assert not stale, f"docs/config.md's task recipes differ from the code for: {stale}"


@pytest.mark.parametrize("rows", [task_rows, source_rows], ids=["model-pairs-and-options", "data-sources"])
def test_every_tasks_declarations_are_in_the_reference(rows):
    def line(row):
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    stale = [row[:2] for row in rows() if line(row) not in CONFIG_DOC]
    assert rows() and not stale, f"docs/config.md's task defaults differ from the declarations for: {stale}"


def test_quickstart_has_exactly_two_commands_and_ci_uses_the_test_one():
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and "-s demo" in commands[0] and "-s tests" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in [line.strip() for line in ci.splitlines()], "CI must run the README's test command"


def test_exit_codes_documented():
    for code in (EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT, EXIT_GATE_FAILED):
        assert f"| {code} |" in README


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_links_between_the_docs_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path) if path else doc
            if not file.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken
