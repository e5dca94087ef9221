"""PINFER_REDIS_URL: plain Redis or Redis Sentinel, parsed in one place (shared/connections.py).

The failover itself runs on real processes in tests/integration/test_sentinel.py; here: the URL
form, what the store and Celery are given, and that a broken URL is refused at start-up.
"""
from __future__ import annotations

import fakeredis
import pytest
from redis.sentinel import SentinelConnectionPool

from shared.broker import make_celery
from shared.connections import celery_broker, connect, parse_sentinel_url
from shared.settings import Settings
from shared.store import Store

URL = "sentinel://:s%3Acret@s1:26380,s2,[::1]:26381/3?master=pinfer&sentinel_password=sp"


def test_the_sentinel_url_names_sentinels_master_database_and_passwords():
    t = parse_sentinel_url(URL)
    assert t.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (t.master, t.db, t.password, t.sentinel_password) == ("pinfer", 3, "s:cret", "sp")
    # The primary's password is not sent to the sentinels, and theirs not to the primary.
    assert t.sentinel_kwargs()["password"] == "sp"


@pytest.mark.parametrize("url, message", [
    ("sentinel://s1:26379/0", "master=NAME"),
    ("sentinel:///0?master=m", "at least one host"),
    ("sentinel://s1:port/0?master=m", "bad sentinel port"),
    ("sentinel://s1/x?master=m", "database must be a number"),
    ("sentinel://s1/0?master=m&service=x", "unknown sentinel option"),
    ("redis://h:notaport/0", "PINFER_REDIS_URL"),
])
def test_a_broken_url_is_refused_when_settings_are_read(url, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"PINFER_REDIS_URL": url})


def test_store_clients_ask_the_sentinels_for_the_primary():
    store = Store(Settings.from_env({"PINFER_REDIS_URL": URL}))
    for client, decode in ((store.r, True), (store.raw, False)):
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "pinfer"
        assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["password"] == "s:cret"
        assert pool.connection_kwargs["decode_responses"] is decode
        assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
                for c in pool.sentinel_manager.sentinels] == [("s1", 26380), ("s2", 26379), ("::1", 26381)]


def test_celery_gets_kombus_sentinel_transport_with_the_master_name():
    broker, options = celery_broker(URL)
    assert broker == ("sentinel://:s%3Acret@s1:26380/3;sentinel://:s%3Acret@s2:26379/3;"
                      "sentinel://:s%3Acret@[::1]:26381/3")
    app = make_celery(Settings.from_env({"PINFER_REDIS_URL": URL}))
    conn = app.connection_for_write()
    assert conn.transport_cls == "sentinel" and conn.password == "s:cret"
    assert [u.split("@")[1] for u in conn.alt] == ["s1:26380/3", "s2:26379/3", "[::1]:26381/3"]
    opts = app.conf.broker_transport_options
    assert opts["master_name"] == "pinfer" and opts["sentinel_kwargs"]["password"] == "sp"
    assert opts["queue_order_strategy"] == "priority"          # pinfer's own options are kept


def test_plain_urls_are_unchanged():
    url = "redis://:pw@h:6380/2"
    assert celery_broker(url) == (url, {})
    client = connect(url)
    assert client.connection_pool.connection_kwargs["host"] == "h"
    assert client.connection_pool.connection_kwargs["db"] == 2


def test_redis_unreachable_answers_503_with_retry_after(make_app, settings, images):
    """What a client sees during a failover: 503 service_unavailable and when to come back."""
    down = fakeredis.FakeServer()
    down.connected = False
    client = make_app(settings, redis_server=down).test_client()
    for resp in (client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg"),
                 client.get("/v1/predictions/AAAAAAAAAAAAAAAAAAAAAA")):
        assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "service_unavailable"
        assert resp.headers["Retry-After"] == str(settings.retry_after_s)
