"""The lock files (requirements/*.txt, `make lock`) stay in step with pyproject.toml.

`make install`, `.ci/run` and deploy/Dockerfile install from them with ``--require-hashes``, so a
dependency added to pyproject.toml but not locked would never be installed (or, worse, the install
would fail only in CI or in the image build). These checks read the files only: no network.
"""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
REQS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _make_locks() -> dict[str, tuple[list[str], Path]]:
    """The Makefile's LOCKS (``name:extras[:project file]``): lock name -> (extras, project file)."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^LOCKS\s*:=((?:.*\\\n)*.*)$", text, re.M)
    assert m, "the Makefile defines LOCKS"
    locks = {}
    for spec in m[1].replace("\\\n", " ").split():
        name, _, rest = spec.partition(":")
        extras, _, src = rest.partition(":")
        locks[name] = ([e for e in extras.split(",") if e], ROOT / (src or "pyproject.toml"))
    return locks


LOCKS = _make_locks()


def _pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a uv/pip-compile lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("--hash="):
            assert name, f"{path.name}: hash before any requirement"
            pins[name][1].append(s.removeprefix("--hash=").rstrip(" \\"))
            continue
        req = Requirement(s.rstrip(" \\"))
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: {s} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = (spec[0].version, [])
    return pins


def _direct(extras: list[str], project: Path) -> list[Requirement]:
    proj = tomllib.loads(project.read_text())["project"]
    reqs = list(proj.get("dependencies", []))
    for extra in extras:
        reqs += proj["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_every_lock_the_makefile_names_exists_and_the_first_is_the_superset():
    assert list(LOCKS)[0] == "all" and {"dev", "worker", "worker-onnx"} <= set(LOCKS)
    superset = {canonicalize_name(r.name) for r in _direct(*LOCKS["all"])}
    for name, (extras, project) in LOCKS.items():
        assert (REQS / f"{name}.txt").is_file(), f"requirements/{name}.txt missing: run `make lock`"
        if project == ROOT / "pyproject.toml":
            assert {canonicalize_name(r.name) for r in _direct(extras, project)} <= superset, name
    # What installs from which lock.
    make = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements/dev.txt" in make
    assert "--require-hashes -r requirements/all.txt" in make        # make bench
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements/worker.txt" in docker


@pytest.mark.parametrize("lock", list(LOCKS))
def test_every_direct_dependency_is_pinned_in_the_lock_within_its_range(lock):
    extras, project = LOCKS[lock]
    pins = _pins(REQS / f"{lock}.txt")
    for req in _direct(extras, project):
        name = canonicalize_name(req.name)
        if name == "torch":
            continue                   # installed by its exact pin in a step of its own (below)
        assert name in pins, f"{req} is not in requirements/{lock}.txt: run `make lock`"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), \
            f"requirements/{lock}.txt pins {name}=={version}, outside pyproject's {req}: run `make lock`"


@pytest.mark.parametrize("lock", list(LOCKS))
def test_locks_are_hashed_cpu_only_and_leave_torch_out(lock):
    pins = _pins(REQS / f"{lock}.txt")
    assert pins, lock
    for name, (_, hashes) in pins.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    # torch's hash differs between the CPU index, mirrors and local builds: never locked.
    assert "torch" not in pins
    cuda = sorted(n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton")
    assert not cuda, f"requirements/{lock}.txt pulls CUDA packages (PyPI's torch?): {cuda}"


def test_one_version_of_each_package_across_all_locks():
    """Every lock is constrained by the superset: the image (worker.txt) runs what CI tested (dev.txt)."""
    seen: dict[str, tuple[str, str]] = {}
    for lock in LOCKS:
        for name, (version, _) in _pins(REQS / f"{lock}.txt").items():
            first = seen.setdefault(name, (version, lock))
            assert first[0] == version, f"{name}: {first[0]} in {first[1]}.txt but {version} in {lock}.txt"


def test_torch_is_pinned_exactly_and_its_own_dependencies_are_locked():
    torch = [Requirement(r) for r in PYPROJECT["optional-dependencies"]["worker"] if r.startswith("torch")]
    assert len(torch) == 1 and str(torch[0].specifier).startswith("=="), torch
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed here (a worker-onnx environment)")
    needed = {canonicalize_name(Requirement(r).name) for r in requires
              if not Requirement(r).marker or Requirement(r).marker.evaluate({"extra": ""})}
    for lock, (extras, _) in LOCKS.items():
        if "worker" in extras:
            missing = needed - set(_pins(REQS / f"{lock}.txt"))
            assert not missing, f"torch needs {sorted(missing)}, not in requirements/{lock}.txt: run `make lock`"


def test_tools_lock_pins_what_tools_in_asks_for():
    pins = _pins(REQS / "tools.txt")
    for line in (REQS / "tools.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert req.specifier.contains(pins[canonicalize_name(req.name)][0]), req
