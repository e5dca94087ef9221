"""The client distribution on its own (`pip install ./client`), the way a laptop user installs it.

Its wheel is built from a copy of client/ and installed without dependencies into a fresh virtual
environment; its requirements (requests, urllib3, tqdm and theirs) are then copied into that
environment from this one, by their installed metadata, so the test needs no network and pip can
check them. torch, Flask, Celery, Redis and the server's packages are not there at all: the
`pinfer-ingest` command and the SDK must work without them, against a (fake) API.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from PIL import Image

from tests.fixtures.fake_api import FakeApi

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVER_SIDE = ("torch", "numpy", "flask", "celery", "redis", "api", "worker", "shared", "weights", "pinfer")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _requirements(dist: md.Distribution) -> list[str]:
    """Names of the distributions ``dist`` needs here (extras and other platforms left out)."""
    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def _copy_with_dependencies(names: list[str], site: Path) -> set[str]:
    """Copy the installed distributions ``names`` and everything they need into ``site``."""
    done: set[str] = set()
    todo = list(names)
    while todo:
        dist = md.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in done:
            continue
        done.add(key)
        for f in dist.files or []:
            src = Path(dist.locate_file(f))
            dst = site / f
            # only files inside site-packages (not console scripts in bin/, not caches)
            if ".." in f.parts or "__pycache__" in f.parts or not src.is_file():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        todo.extend(_requirements(dist))
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv holding the client wheel and its dependencies only."""
    base = tmp_path_factory.mktemp("client")
    src = base / "src"
    shutil.copytree(ROOT / "client", src,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist"))
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", dist, src])
    wheel = next(dist.glob("pinfer_client-*.whl"))
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pinfer_client"}, top

    env_dir = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir])
    py = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps", "--no-index", wheel])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert site != Path(sysconfig.get_paths()["purelib"])
    installed = next(md.distributions(name="pinfer-client", path=[str(site)]))  # what the wheel declares
    copied = _copy_with_dependencies(_requirements(installed), site)
    assert {"requests", "tqdm", "urllib3"} <= copied
    # every requirement of the client is met by what was copied, and nothing else is there
    _run([sys.executable, "-m", "pip", "--python", py, "check"])
    return env_dir / "bin"


def _clean_env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}


def test_client_alone_has_no_server_or_heavy_packages(venv, tmp_path):
    code = ("import importlib.util, json, pinfer_client, pinfer_client.ingest\n"
            f"print(json.dumps([m for m in {SERVER_SIDE!r} if importlib.util.find_spec(m) is not None]))\n"
            "print(pinfer_client.__file__)")
    out = _run([venv / "python", "-c", code], cwd=tmp_path, env=_clean_env(tmp_path)).stdout.splitlines()
    assert json.loads(out[0]) == []
    assert out[1].startswith(str(venv.parent)), "not the installed package"


@pytest.mark.parametrize("cmd", [["pinfer-ingest"], ["python", "-m", "pinfer_client.ingest"]])
def test_ingest_help_from_the_client_alone(venv, tmp_path, cmd):
    out = _run([venv / cmd[0], *cmd[1:], "--help"], cwd=tmp_path, env=_clean_env(tmp_path)).stdout
    for flag in ("--api", "--out", "--csv", "--top-k", "--concurrency", "--chunk", "--name", "--no-progress"):
        assert flag in out


def test_ingest_from_the_client_alone_classifies_a_folder(venv, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, rel in enumerate(("a.png", "sub/b.jpg", "sub/c.png")):
        Image.new("RGB", (4, 4), (i * 60, 20, 40)).save(photos / rel)
    out = tmp_path / "results.jsonl"
    with FakeApi() as api:
        result = _run([venv / "pinfer-ingest", photos, "--api", api.url, "--out", out, "--no-progress",
                       "--poll-interval", "0.01"], cwd=tmp_path, env=_clean_env(tmp_path))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["name"] for r in lines) == ["a.png", "sub/b.jpg", "sub/c.png"]
    assert all(r["status"] == "succeeded" and len(r["top_k"]) == 5 for r in lines)
    assert "succeeded  3" in result.stdout
    assert os.path.exists(str(out) + ".state.json")
