"""The result cache on a real stack: an identical upload is answered at once, without inference,
and a bulk job over a folder with duplicates classifies each distinct image once."""
from __future__ import annotations

import time

import pytest

from pinfer_client import Client
from tests.integration.conftest import jpeg

pytestmark = pytest.mark.integration


def test_identical_uploads_are_answered_from_the_cache(make_stack):
    stack = make_stack(workers=1, PINFER_CACHE_TTL_S=3600)
    distinct = [jpeg(((41 * i) % 256, 90, (77 * i) % 256)) for i in range(12)]
    first = stack.result(stack.submit(distinct[0], top_k=3)["id"])
    assert first["status"] == "succeeded" and first["cached"] is False

    r = stack.http.post(f"{stack.base}/v1/predictions", params={"top_k": 3},
                        files={"image": ("again.jpg", distinct[0])}, timeout=30)
    assert r.status_code == 200, r.text
    hit = r.json()
    assert hit["status"] == "succeeded" and hit["cached"] is True and hit["id"] != first["id"]
    assert hit["top_k"] == first["top_k"] and hit["model"] == first["model"]
    assert stack.result(hit["id"])["cached"] is True

    # a job over 12 distinct images, then the same 12 three more times under other names
    with Client(stack.base) as c:
        job = c.create_job("dups", top_k=5)
        added = c.add_images(job["id"], [(f"a/{i}.jpg", d) for i, d in enumerate(distinct)])
        for a in added.accepted:  # each distinct image classified once (the first is a cache hit)
            assert stack.result(a["id"])["status"] == "succeeded"
        t0 = time.monotonic()
        res = c.add_images(job["id"], [(f"{k}/{i}.jpg", d) for k in "bcd" for i, d in enumerate(distinct)])
        c.close_job(job["id"])
        final = c.get_job(job["id"])
        dup_s = time.monotonic() - t0
    assert all(a.get("cached") for a in res.accepted) and len(res.accepted) == 36, res.accepted[:3]
    assert final["status"] == "finished" and final["counts"]["succeeded"] == 48, final
    print(f"\nresult cache: 36 duplicate images answered from the cache and the job finished in {dup_s:.2f}s "
          f"({36 / dup_s:.0f} images/s, no inference)")
