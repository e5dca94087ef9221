"""API keys: who may call, and that nobody reads what is not theirs."""
from __future__ import annotations

import io
import logging

import pytest

from api.auth import hash_key
from pinfer.cli import main as cli
from shared import keys
from tests.unit.helpers import assert_error

ALICE, BOB = "pk_alice-secret", "pk_bob-secret"


@pytest.fixture
def keyed(make_app, settings, tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# name sha256\nalice {hash_key(ALICE)}\nbob {hash_key(BOB)}\n")
    s = settings.replace(api_keys_file=str(f), max_pending_per_key=2)
    return make_app(s).test_client(), s


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def post(client, data, key):
    return client.post("/v1/predictions", data=data, content_type="image/jpeg", headers=auth(key))


def test_missing_or_invalid_key_is_401_and_health_stays_open(keyed, images, recorder):
    client, _ = keyed
    r = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg")
    assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(post(client, images.jpeg(), "pk_wrong"), 401, "unauthorized")
    assert_error(client.get("/v1/stats"), 401, "unauthorized")
    assert_error(client.post("/v1/jobs", json={}, headers={"Authorization": "Basic eDp5"}), 401, "unauthorized")
    assert recorder.calls == []
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # open (no worker here), not 401
    assert client.get("/").status_code == 200
    assert client.get("/v1/stats", headers=auth(ALICE)).status_code == 200


def test_predictions_and_jobs_belong_to_their_key(keyed, images):
    client, _ = keyed
    pid = post(client, images.jpeg(), ALICE).get_json()["id"]
    assert client.get(f"/v1/predictions/{pid}", headers=auth(ALICE)).status_code == 200
    assert_error(client.get(f"/v1/predictions/{pid}", headers=auth(BOB)), 404, "not_found")
    jid = client.post("/v1/jobs", json={"name": "a"}, headers=auth(ALICE)).get_json()["id"]
    files = {"images": [(io.BytesIO(images.png()), "x.png")]}
    for method, path, kw in (("get", f"/v1/jobs/{jid}", {}), ("get", f"/v1/jobs/{jid}/results", {}),
                             ("post", f"/v1/jobs/{jid}/images", {"data": files, "content_type": "multipart/form-data"}),
                             ("post", f"/v1/jobs/{jid}/close", {}), ("delete", f"/v1/jobs/{jid}", {})):
        assert_error(getattr(client, method)(path, headers=auth(BOB), **kw), 404, "not_found")
    job = client.get(f"/v1/jobs/{jid}", headers=auth(ALICE)).get_json()
    assert job["status"] == "open" and job["counts"]["total"] == 0  # bob changed nothing


def test_each_key_has_its_own_pending_bound(keyed, images, store):
    client, _ = keyed
    assert post(client, images.jpeg(), ALICE).status_code == 202
    assert post(client, images.png(), ALICE).status_code == 202
    refused = post(client, images.jpeg(color=(1, 2, 3)), ALICE)
    assert_error(refused, 429, "overloaded")
    assert refused.headers["Retry-After"]
    assert post(client, images.jpeg(), BOB).status_code == 202  # bob is not held by alice's backlog
    assert store.r.zcard(keys.key_pending("alice")) == 2 and store.r.zcard(keys.PENDING) == 3


def test_idempotency_keys_are_scoped_per_api_key(keyed, images):
    client, _ = keyed
    h = {"Idempotency-Key": "same"}
    a = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg", headers={**h, **auth(ALICE)})
    b = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg", headers={**h, **auth(BOB)})
    assert a.status_code == b.status_code == 202 and a.get_json()["id"] != b.get_json()["id"]


def test_keys_never_reach_the_logs(keyed, images, caplog):
    client, _ = keyed
    with caplog.at_level(logging.DEBUG):
        post(client, images.jpeg(), ALICE)
        post(client, images.jpeg(), "pk_wrong")
    assert ALICE not in caplog.text and "pk_wrong" not in caplog.text


def test_pinfer_api_key_stores_only_a_hash(tmp_path, capsys):
    f = tmp_path / "keys"
    assert cli(["api-key", "ci", "--file", str(f)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("pk_") and key not in f.read_text()
    assert f.read_text().split() == ["ci", hash_key(key)]
    assert cli(["api-key", "ci", "--file", str(f)]) == 1  # one key per name
    assert (f.stat().st_mode & 0o077) == 0
