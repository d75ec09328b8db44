"""Property-based: any config, however wrong, is a valid run plan or one clean ConfigError.

Hypothesis generates configs from the real schema (every table and key, plus misspelt keys,
unknown tables and values of every TOML type) and TOML texts with random damage. Whatever it
makes, loading the config and planning the run must either succeed or raise ConfigError with a
one-line message: never another exception (a traceback for the user).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import config as config_mod
from pipeline.config import ConfigError, reference_rows
from pipeline.runner import RunOptions, select
from pipeline.stage import load_stages

KEYS = [key for key, _, _ in reference_rows()]
TABLES = sorted({k.rsplit(".", 1)[0] for k in KEYS})
STAGES = load_stages()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["resnet18", "layer4", "cuda", "auto", "int8", "entropy", "digits", ""]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=2))


@st.composite
def raw_configs(draw) -> dict:
    raw: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=6)):
        *tables, leaf = key.split(".")
        node = raw
        for t in tables:
            nxt = node.setdefault(t, {})
            if not isinstance(nxt, dict):  # a scalar drawn where a table lives: keep it, it is a bad config too
                break
            node = nxt
        else:
            node[leaf] = draw(values)
    if draw(st.booleans()):  # junk: unknown keys and tables, a scalar in place of a table
        raw[draw(st.sampled_from(TABLES + ["nonsense"]))] = draw(st.one_of(values, st.dictionaries(
            st.sampled_from(["epochs", "arch", "ratio", "typo_key"]), values, max_size=2)))
    return raw


def _plan(cfg) -> list[str]:
    return select(STAGES, RunOptions())


def _one_clean_line(exc: ConfigError) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_configs())
def test_any_config_dict_is_a_plan_or_a_clean_error(raw):
    try:
        cfg = config_mod.from_dict(raw, Path("."))
    except ConfigError as exc:
        _one_clean_line(exc)
        return
    assert _plan(cfg)  # a valid config always gives a non-empty plan


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_damaged_toml_is_a_plan_or_a_clean_error(tmp_path, data):
    text = (Path(__file__).resolve().parents[1] / "pipeline.toml").read_text()
    pos = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 40))
    insert = data.draw(st.text(alphabet="[]=\"'.#\n abc0123-_", max_size=20))
    damaged = text[:pos] + insert + text[pos + cut:]
    path = tmp_path / "pipeline.toml"
    path.write_text(damaged)
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        _one_clean_line(exc)
        try:
            tomllib.loads(damaged)
        except tomllib.TOMLDecodeError:
            assert "malformed TOML" in str(exc)  # a syntax error is called one, with line and column
        return
    assert _plan(cfg)
