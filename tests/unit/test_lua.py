"""shared/lua: the scripts are files shipped with the package, and every key, status and TTL they use
comes from Python (the data model ``Store`` passes as ARGV[1]), so the data model lives in
shared/keys.py, shared/schema.py and the settings alone."""
from __future__ import annotations

import re
from importlib.resources import files

import pytest

from shared import keys, lua
from shared.schema import IDEM_CREATED, IDEM_PENDING, JOB_CLOSED, JOB_FINISHED, JOB_OPEN, STATUSES, WEBHOOK_PENDING
from shared.settings import Settings
from shared.store import data_model

LUA = files(lua.__name__)


def lua_files() -> dict[str, str]:
    return {p.name[:-4]: p.read_text(encoding="utf-8") for p in LUA.iterdir() if p.name.endswith(".lua")}


def code(text: str) -> str:
    """The Lua without its comments."""
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def test_every_script_file_is_registered_and_loads_with_the_library_first():
    scripts = lua_files()
    assert set(scripts) - {"lib"} == set(lua.NAMES)
    for name in lua.NAMES:
        assert lua.source(name).startswith(scripts["lib"]) and lua.source(name).endswith(scripts[name])


def problems(text: str) -> list[str]:
    """What a script spells that should come from Python: statuses, keys built from strings, TTLs."""
    body = code(text)
    literals = set(re.findall(r"'([^']*)'", body)) | set(re.findall(r'"([^"]*)"', body))
    out = [f"status {s!r}" for s in sorted(literals & {JOB_OPEN, JOB_CLOSED, JOB_FINISHED, WEBHOOK_PENDING,
                                                          IDEM_PENDING, IDEM_CREATED, *STATUSES})]
    out += [f"key {s!r}" for s in sorted(literals) if s.startswith((keys.PREFIX, ":"))]
    for line in body.splitlines():
        ttl = re.search(r"'EX',\s*([^,)]*)|'EXPIRE',\s*(.*)\)", line)  # what follows EX / EXPIRE
        if ttl and re.search(r"\b\d+\b", re.sub(r"\w+\[\w+\]|'[^']*'", "", ttl.group(1) or ttl.group(2))):
            out.append(f"TTL in {line.strip()!r}")
    return out


def test_the_check_below_finds_what_the_scripts_used_to_spell():
    old = """if st ~= 'open' then return {'job_' .. st} end  -- 'closed' in a comment is fine
redis.call('ZREM', jk .. ':pending', ARGV[1])
redis.call('EXPIRE', jk .. ':rate', 300)
redis.call('SET', KEYS[3], ARGV[6], 'EX', 60)
redis.call('EXPIRE', KEYS[5], M.ttl.result)"""
    assert problems(old) == ["status 'open'", "key ':pending'", "key ':rate'",
                             "TTL in \"redis.call('EXPIRE', jk .. ':rate', 300)\"",
                             "TTL in \"redis.call('SET', KEYS[3], ARGV[6], 'EX', 60)\""]


@pytest.mark.parametrize("name", sorted(lua_files()))
def test_no_script_spells_a_key_a_status_or_a_ttl(name):
    assert problems(lua_files()[name]) == [], f"{name}.lua: take these from M (the data model) or KEYS"


def test_templates_are_the_keys_of_shared_keys():
    tpl = data_model(Settings())["tpl"]
    assert all(t.count("{}") == 1 for t in tpl.values())
    fill = {name: (lambda t: lambda i: t.replace("{}", i))(t) for name, t in tpl.items()}
    assert fill["job"]("J") == keys.job("J") and fill["job_pending"]("J") == keys.job_pending("J")
    assert fill["job_done"]("J") == keys.job_done("J") and fill["job_rate"]("J") == keys.job_rate("J")
    assert fill["key_pending"]("alice") == keys.key_pending("alice")
    assert fill["job_event"]("J") == keys.job_event("J") and fill["cache"]("d") == keys.cache("d")


def test_the_model_carries_the_settings_bounds_and_ttls():
    s = Settings().replace(result_ttl_s=123, image_ttl_s=45, max_pending_images=7, cache_max_entries=9)
    m = data_model(s)
    assert (m["ttl"]["result"], m["ttl"]["image"], m["max_pending"], m["cache_max_entries"]) == (123, 45, 7, 9)
    assert m["ttl"]["rate"] == keys.RATE_TTL_S and m["ttl"]["idem_pending"] == keys.IDEMPOTENCY_PENDING_S
    assert m["done_channel"] == keys.DONE_CHANNEL
