"""The README stays in step with the code: every config key and exit code is documented."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import reference_rows
from pipeline.runner import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, EXIT_STAGE_FAILED

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_config_key_is_in_the_reference_with_its_default():
    missing = [key for key, _, _ in reference_rows() if f"| `{key}` |" not in README]
    assert not missing, f"README config reference lacks: {missing}"
    stale = [f"{key} = {default}" for key, default, _ in reference_rows() if f"| `{key}` | `{default}` |" not in README]
    assert not stale, f"README config reference has other defaults than the code for: {stale}"


def test_quickstart_has_exactly_two_commands_and_ci_uses_the_test_one():
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and "-s demo" in commands[0] and "-s tests" in commands[1]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert commands[1] in [line.strip() for line in ci.splitlines()], "CI must run the README's test command"


def test_exit_codes_documented():
    for code in (EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT, EXIT_GATE_FAILED):
        assert f"| {code} |" in README
