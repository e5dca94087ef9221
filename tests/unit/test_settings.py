"""shared.settings: PINFER_* variables are parsed by type, bad values are refused with a message that
names the variable, and the README table lists every setting."""
from __future__ import annotations

from dataclasses import fields

import pytest

from shared.settings import Settings


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.max_top_k, s.default_top_k, s.precision, s.core_lease) == (20, 5, "auto", False)


def test_parses_ints_floats_strings_and_bools():
    s = Settings.from_env({"PINFER_MAX_BATCH": "8", "PINFER_MAX_WAIT_S": "2.5", "PINFER_MAX_ASPECT_RATIO": "10",
                           "PINFER_CORES": "0-3,6", "PINFER_CORE_LEASE": "true", "PINFER_REDIS_URL": "redis://x:1/2"})
    assert s.max_batch == 8 and isinstance(s.max_batch, int)
    assert s.max_wait_s == 2.5 and s.max_aspect_ratio == 10.0 and isinstance(s.max_aspect_ratio, float)
    assert s.cores == "0-3,6" and s.redis_url == "redis://x:1/2"
    assert s.core_lease is True


@pytest.mark.parametrize("raw,expected", [("1", True), ("yes", True), ("ON", True), ("True", True),
                                          ("0", False), ("no", False), ("off", False), ("FALSE", False)])
def test_bool_spellings(raw, expected):
    assert Settings.from_env({"PINFER_CORE_LEASE": raw}).core_lease is expected


def test_empty_variable_means_default():
    assert Settings.from_env({"PINFER_MAX_BATCH": "", "PINFER_CORE_LEASE": ""}) == Settings()


def test_overrides_win_over_the_environment():
    assert Settings.from_env({"PINFER_MAX_BATCH": "8"}, max_batch=2).max_batch == 2


@pytest.mark.parametrize("env,value", [("PINFER_MAX_BATCH", "eight"), ("PINFER_MAX_BATCH", "2.5"),
                                       ("PINFER_MAX_WAIT_S", "soon"), ("PINFER_CORE_LEASE", "maybe"),
                                       ("PINFER_PORT", "80a")])
def test_bad_values_are_refused_naming_the_variable(env, value):
    with pytest.raises(ValueError) as exc:
        Settings.from_env({env: value})
    assert env in str(exc.value) and repr(value) in str(exc.value)


def test_choices_are_validated():
    with pytest.raises(ValueError) as exc:
        Settings.from_env({"PINFER_PRECISION": "fp16"})
    assert "PINFER_PRECISION" in str(exc.value) and "fp32" in str(exc.value) and "bf16" in str(exc.value)
    with pytest.raises(ValueError, match="PINFER_RESIZE"):
        Settings.from_env({"PINFER_RESIZE": "approximate"})
    assert Settings.from_env({"PINFER_PRECISION": "bf16", "PINFER_RESIZE": "fast"}).resize == "fast"


@pytest.mark.parametrize("env", ["PINFER_MAX_BATCH", "PINFER_MAX_TOP_K", "PINFER_MAX_UPLOAD_BYTES",
                                 "PINFER_MAX_DELIVERIES", "PINFER_BULK_CHUNK"])
def test_limits_below_one_are_refused(env):
    with pytest.raises(ValueError, match=env):
        Settings.from_env({env: "0"})


def test_visibility_timeout_has_a_floor():
    with pytest.raises(ValueError, match="PINFER_VISIBILITY_TIMEOUT_S"):
        Settings.from_env({"PINFER_VISIBILITY_TIMEOUT_S": "2"})


def test_replace_returns_a_new_settings():
    s = Settings()
    t = s.replace(max_batch=3)
    assert t.max_batch == 3 and s.max_batch == 16


def test_markdown_table_lists_every_variable_once():
    table = Settings.markdown_table()
    lines = table.splitlines()
    assert lines[0] == "| Variable | Default | Meaning |"
    envs = [f.metadata["env"] for f in fields(Settings)]
    assert len(lines) == 2 + len(envs)
    for env, line in zip(envs, lines[2:]):
        assert line.startswith(f"| `{env}` |"), line
    assert len(set(envs)) == len(envs) and all(e.startswith("PINFER_") for e in envs)
    assert "`weights/build`" in table  # not this machine's absolute path
    assert "| `PINFER_CORES` | (empty) |" in table


def test_readme_settings_table_matches_the_code():
    """The README's table is generated (`make settings-table`); a stale copy fails here."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert Settings.markdown_table() in readme
