"""Turning ``PINFER_REDIS_URL`` into connections: the one place that knows plain Redis from Sentinel.

``PINFER_REDIS_URL`` is either a plain Redis URL (``redis://``, ``rediss://``, ``unix://``, as
redis-py reads them) or a Redis Sentinel URL::

    sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/DB]?master=NAME[&sentinel_password=S][&sentinel_username=U]

* HOST:PORT are the *sentinels* (port 26379 when omitted), comma-separated, as many as you run;
* ``master`` is the name the sentinels monitor (``sentinel monitor NAME ...``), required;
* USER/PASSWORD authenticate to the Redis primary (``requirepass``/ACL), DB is its database (0);
* ``sentinel_password``/``sentinel_username`` authenticate to the sentinels themselves, when they
  have ``requirepass`` of their own (percent-encode special characters in all of them).

Every Redis client pinfer makes goes through ``connect`` (the store, long-poll pub/sub, heartbeats,
sweeper, core leases) and the Celery broker through ``celery_broker``: with Sentinel both ask the
sentinels for the current primary whenever they (re)connect, so after a failover they follow the
new primary without a restart. redis-py's ``Sentinel`` and kombu's ``sentinel://`` transport do
the work; this module only translates one URL into what each of them expects (kombu wants one
``sentinel://`` URL per sentinel joined by ``;`` and the master name as a transport option).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
#: How long a sentinel may take to answer "who is the primary": a dead sentinel must not stall
#: every reconnect; the next one in the list is asked instead.
SENTINEL_SOCKET_TIMEOUT_S = 1.0
#: Connect timeout to the primary when using Sentinel: a primary on a dead host (no RST) must fail
#: fast so the client asks the sentinels again.
PRIMARY_CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection options for the sentinels themselves (never the primary's password)."""
        kw: dict[str, Any] = {"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
                              "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S}
        if self.sentinel_password:
            kw["password"] = self.sentinel_password
        if self.sentinel_username:
            kw["username"] = self.sentinel_username
        return kw


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse the ``sentinel://`` form above; ValueError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"not a sentinel:// URL: {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, (h.strip() for h in hostlist.split(","))):
        host, sep, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not sep:
            host, port = item, ""
        host = host.strip("[]")
        if not host:
            raise ValueError(f"PINFER_REDIS_URL: empty sentinel host in {item!r}")
        try:
            sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
        except ValueError:
            raise ValueError(f"PINFER_REDIS_URL: bad sentinel port in {item!r}") from None
    if not sentinels:
        raise ValueError("PINFER_REDIS_URL: a sentinel:// URL needs at least one host:port")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - {"master", "sentinel_password", "sentinel_username"}
    if unknown:
        raise ValueError(f"PINFER_REDIS_URL: unknown sentinel option(s) {', '.join(sorted(unknown))}")
    master = query.get("master", "")
    if not master:
        raise ValueError("PINFER_REDIS_URL: a sentinel:// URL needs ?master=NAME (the name the sentinels monitor)")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError(f"PINFER_REDIS_URL: the database must be a number, not {path!r}") from None
    return SentinelTarget(tuple(sentinels), master, db, username, password,
                          query.get("sentinel_username") or None, query.get("sentinel_password") or None)


def validate_url(url: str) -> None:
    """Raise ValueError for a URL neither redis-py nor the sentinel parser accepts."""
    if is_sentinel(url):
        parse_sentinel_url(url)
        return
    try:
        redis.connection.parse_url(url)
    except ValueError as exc:
        raise ValueError(f"PINFER_REDIS_URL: {exc}") from None


def connect(url: str, decode: bool = True) -> redis.Redis:
    """A client for the primary named by ``url`` (text replies with ``decode``, bytes without)."""
    common: dict[str, Any] = dict(decode_responses=decode, health_check_interval=30, socket_keepalive=True,
                                  retry_on_timeout=True)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **common)
    t = parse_sentinel_url(url)
    sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=t.sentinel_kwargs())
    return sentinel.master_for(t.master, redis_class=redis.Redis, db=t.db, username=t.username,
                               password=t.password, socket_connect_timeout=PRIMARY_CONNECT_TIMEOUT_S, **common)


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The broker URL for kombu and the transport options it needs on top of pinfer's own."""
    if not is_sentinel(url):
        return url, {}
    t = parse_sentinel_url(url)
    auth = ""
    if t.username or t.password:
        auth = f"{quote(t.username or '', safe='')}:{quote(t.password or '', safe='')}@"
    broker = ";".join(f"sentinel://{auth}{_host(h)}:{p}/{t.db}" for h, p in t.sentinels)
    return broker, {"master_name": t.master, "sentinel_kwargs": t.sentinel_kwargs()}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["SentinelTarget", "celery_broker", "connect", "is_sentinel", "parse_sentinel_url", "validate_url"]
