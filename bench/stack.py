"""A benchmark's stack: :class:`pinfer.stack.Stack` (the one stack harness, shared with ``pinfer up``
and the integration tests) with the benchmarks' defaults, or the seed-design baseline.

``Stack(name, model_dir, workers=k, apis=n, nginx=..., env=..., cores=...)`` is started by ``with``
and always stopped at the end. Its processes run in sessions of their own, so a Ctrl-C reaches
only the benchmark, which stops the stack in order. ``baseline=True`` starts instead only gunicorn
serving ``bench/baselines/flask_sync.py``. Logs go to ``bench/out/logs/<stack name>/``: after a
run, grep them for errors (``Stack.log_problems``).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pinfer import stack as _stack
from pinfer.procs import Proc, free_port, wait_until
from pinfer.stack import descendants, healthy, ready_times  # noqa: F401 (benchmarks import them from here)
from shared.settings import PROJECT_ROOT

OUT_DIR = PROJECT_ROOT / "bench" / "out"
BASELINE_APP = "bench.baselines.flask_sync:create_app()"


class BenchError(RuntimeError):
    pass


class Stack(_stack.Stack):
    """``workers``: k for one ``pinfer worker`` launcher (0: start none yet); ``apis``: gunicorn
    servers; ``nginx``: nginx in front; ``env``: extra PINFER_* settings; ``cores``: pin every
    process of the stack to these cores."""

    def __init__(self, name: str, model_dir: Path, workers: int = 1, apis: int = 1, nginx: bool = False,
                 env: dict[str, str] | None = None, log_root: Path = OUT_DIR / "logs",
                 ready_timeout: float = 180.0, cores: list[int] | None = None, baseline: bool = False) -> None:
        workdir = Path(log_root) / name
        shutil.rmtree(workdir, ignore_errors=True)
        super().__init__(workdir, _stack.stack_env(model_dir, cores=cores), cores=cores, new_session=True,
                         ready_timeout=ready_timeout)
        self.env.update({k: str(v) for k, v in (env or {}).items()})
        self.name, self.baseline = name, baseline
        self._plan = (workers, apis, nginx)

    def __enter__(self) -> "Stack":
        workers, apis, nginx = self._plan
        if self.baseline:
            try:
                self.start_baseline()
            except BaseException:
                self.stop()
                raise
        else:
            self.up(workers=workers, apis=apis, nginx=nginx)
        return self

    def start_baseline(self) -> Proc:
        """The seed documents' design: one synchronous gunicorn worker process (the default ``sync``
        class), the model loaded once in it. Not preloaded: torch state must not cross a fork."""
        port = free_port()
        cmd = [sys.executable, "-m", "gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}",
               "--timeout", "120", "--access-logfile", "-", BASELINE_APP]
        with _stack.pinned(self.cores), open(self.workdir / f"api-{port}.log", "ab") as out:
            p = subprocess.Popen(cmd, env=self.env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        proc = Proc(f"baseline:{port}", p)
        self._add(proc)
        base = f"http://127.0.0.1:{port}"
        self.api_bases.append(base)
        wait_until(lambda: healthy(base), 120, f"API {base}", p)
        return proc
