"""`pinfer api` from an installed wheel, the way the image runs it: no source tree anywhere near.

The wheel is built from a copy of the package sources (no build artefacts in the checkout), installed
without dependencies into a fresh virtual environment whose only other import path is this
environment's site-packages (its dependencies, but not the editable install of the checkout), and
`pinfer api --print-config` is run from an empty folder: gunicorn must find its settings in the
installed package and apply the PINFER_* settings.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "worker", "shared", "weights", "pinfer")  # the client has its own wheel (client/)


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a venv holding only the pinfer wheel."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in (*PACKAGES, "client"):  # client/ too, as in a checkout: the server wheel must leave it out
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = base / "dist"
    # No build isolation: the build backend (setuptools, from the `test` extra) is already here,
    # and nothing is downloaded.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", dist, src])
    wheel = next(dist.glob("pinfer-*.whl"))
    # exactly the server's packages at the top level: the client is a distribution of its own
    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == set(PACKAGES), top
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps",
          "--no-index", wheel])
    # Dependencies from this environment, appended after the venv's own site-packages. A plain
    # path in a .pth file does not run that folder's own .pth files, so the editable install of
    # the checkout stays out.
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env={"PATH": os.environ.get("PATH", "")}).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_pinfer_api_finds_its_gunicorn_config_in_the_installed_package(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": f"{installed}:{os.environ.get('PATH', '')}", "HOME": str(tmp_path),
           "PINFER_API_THREADS": "77", "PINFER_MAX_WAITERS": "50", "PINFER_PORT": "9911"}
    where = _run([installed / "python", "-c", "import pinfer, api; print(pinfer.__file__); print(api.__file__)"],
                 cwd=elsewhere, env=env).stdout.split()
    assert all(p.startswith(str(installed.parent)) for p in where), f"not the installed package: {where}"
    assert not (Path(where[0]).parent.parent / "deploy").exists()

    out = _run([installed / "pinfer", "api", "--print-config"], cwd=elsewhere, env=env).stdout
    config = {k.strip(): v.strip() for k, v in (line.split(" = ", 1) for line in out.splitlines() if " = " in line)}
    assert config["config"] == "python:pinfer.gunicorn_conf"
    assert (config["threads"], config["bind"]) == ("77", "['0.0.0.0:9911']")  # the settings applied
    assert config["worker_class"] == "gthread"


def test_the_redis_scripts_are_in_the_installed_package(installed, tmp_path):
    """shared/lua/*.lua are package data: without them every Store call fails at start."""
    out = _run([installed / "python", "-c",
                "from shared import lua; print(lua.__file__); print(sum(len(lua.source(n)) for n in lua.NAMES))"],
               cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}).stdout.split()
    assert out[0].startswith(str(installed.parent)) and int(out[1]) > 0
