"""Real processes on loopback: redis-server, `pinfer worker` (pinned Celery workers), gunicorn.

``make_stack(workers=N, **settings)`` composes a :class:`pinfer.stack.Stack` (the stack `pinfer up`
and the benchmarks run), waits until it serves, and stops everything at the end of the module.
Each stack has its own Redis, so tests never need to flush a database under running workers.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest
from PIL import Image

from pinfer.stack import Stack
from shared.schema import TERMINAL  # noqa: F401 (tests import it from here)

# On top of pinfer.stack.TEST_ENV (fp32, exact resize, no result cache: these tests resubmit images
# and must see real inference; tests/integration/test_cache.py turns the cache on).
STACK_ENV = {"PINFER_API_PROCESSES": "2", "PINFER_API_THREADS": "32", "PINFER_MAX_WAITERS": "24"}

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A fast-loading fixture artifact (tests/fixtures/models.py): for tests whose workers restart
    often (poison kills) or whose forward passes must be quick (batching)."""
    from tests.fixtures.models import make_fixture_model

    d = tmp_path_factory.mktemp("tiny-model")
    make_fixture_model("tiny", d)
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A seeded random-init artifact: the official weights cannot be downloaded here."""
    from weights.export import export_model

    d = tmp_path_factory.mktemp("model")
    export_model(d, random_init=True, seed=0)
    return d


@pytest.fixture(scope="module")
def make_stack(tmp_path_factory, model_dir) -> Iterator[Callable[..., Stack]]:
    """``make_stack(workers=N, api=True, **settings)``: a started :class:`pinfer.stack.Stack`
    (own Redis, ``N`` pinned workers, one API unless ``api=False``); stopped at the end of the module."""
    stacks: list[Stack] = []

    def make(workers: int = 1, api: bool = True, **env_overrides: object) -> Stack:
        stack = Stack.create(tmp_path_factory.mktemp("stack"), model_dir)
        stacks.append(stack)
        stack.env.update(STACK_ENV)
        stack.up(workers=workers, apis=1 if api else 0, PINFER_WORKERS=workers, **env_overrides)
        return stack

    yield make
    with ThreadPoolExecutor(max(1, len(stacks))) as pool:  # independent stacks: stop them side by side
        list(pool.map(Stack.stop, stacks))


def jpeg(color=(200, 30, 30), size=(320, 240), extra: bytes = b"") -> bytes:
    """A small synthetic JPEG; ``extra`` is appended after EOI (decoders ignore it)."""
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 16):  # some structure so different colours give different outputs
        img.paste((color[2], color[0], color[1]), (x, 0, x + 8, size[1]))
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue() + extra
