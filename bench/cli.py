"""``python -m bench``: run the benchmarks, print the tables, write the JSON, the plot and the README block.

    python -m bench [NAME ...] [--quick] [--variants GLOB,...] [--service-variant NAME|fastest]
                    [--out FILE] [--publish] [--list]

NAME: the benchmarks of ``bench/benchmarks/__init__.py`` (default: all, in that order). A full run
with ``--publish`` (what ``make bench`` does) writes ``bench/results/latest.json`` and
``bench/results/throughput_latency.png`` and regenerates the README's benchmark block; any other
run writes ``bench/out/results.json`` (git-ignored) and leaves the README alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import report
from bench.benchmarks import BENCHMARKS, summary
from bench.core import Ctx, Figures, Skip
from bench.corpus import load_corpus, materialize
from bench.http import close_clients
from bench.plot import plot
from bench.stack import OUT_DIR
from bench.variants import VARIANTS, export_models, select
from shared.settings import PROJECT_ROOT

SCHEMA = 1
SCRATCH = OUT_DIR / "results.json"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="benchmarks:\n" + "\n".join(f"  {n:<10} {summary(n)}" for n in BENCHMARKS))
    ap.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    ap.add_argument("--only", default="", help="comma-separated benchmarks (same as NAMEs)")
    ap.add_argument("--quick", action="store_true", help="smaller samples and fewer variants (a smoke run)")
    ap.add_argument("--variants", default="", help="comma-separated globs over variant names, e.g. "
                    "'torchscript-*-fast,onnx-int8-exact' (default: the whole matrix)")
    ap.add_argument("--service-variant", default="fastest",
                    help="variant of bulk/priority/drain/recovery/proxy (default: the fastest in-process)")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {SCRATCH}, or "
                    f"{report.RESULTS} with --publish)")
    ap.add_argument("--publish", action="store_true", help="a full run: write bench/results/ and the README block")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and variants, and exit")
    args = ap.parse_args(argv)
    args.names = [n for n in args.names + args.only.split(",") if n]
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    partial = bool(args.names or args.variants) or args.quick
    if args.publish and partial:
        print("note: --publish ignored: only a full run (all benchmarks and variants, no --quick) is published")
        args.publish = False
    args.out = args.out or (report.RESULTS if args.publish else SCRATCH)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        for n in BENCHMARKS:
            print(f"{n:<10} {summary(n)}")
        print("variants: " + " ".join(v.name for v in VARIANTS))
        return 0
    names = [n for n in BENCHMARKS if n in args.names] if args.names else list(BENCHMARKS)
    variants = select([p for p in args.variants.split(",") if p], args.quick)

    def on_term(signum, _frame):  # noqa: ANN001 (SIGTERM like Ctrl-C: finally blocks stop the stacks)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    corpus = load_corpus()
    cores = sorted(os.sched_getaffinity(0))
    server, client = cores[:1], cores[1:] or cores[:1]
    tmp = Path(tempfile.mkdtemp(prefix="pinfer-bench-"))
    print(f"pinfer bench: {', '.join(names)}{' (quick)' if args.quick else ''}; variants: "
          f"{' '.join(v.name for v in variants)}; servers on core {server}, load generator on {client}; "
          f"{corpus.describe()}", flush=True)
    if corpus.synthetic:
        print("  WARNING: photo corpus not found (../shared/corpus/photos or PINFER_CORPUS_DIR): using SYNTHETIC "
              "JPEGs; figures are not comparable with corpus figures")
    if len(cores) < 2:
        print("  WARNING: one core only: servers and load generator share it")
    res: dict = {"schema": SCHEMA, "meta": meta(args, names, corpus, cores, server, client), "variants": [],
                 "benchmarks": {}, "targets": [], "plot": None}
    t_all = time.perf_counter()
    try:
        corpus_dir = materialize(corpus, tmp / "synthetic")
        print("exporting the model (every precision this code builds) …", flush=True)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        exported = export_models(tmp / "model", corpus_dir, OUT_DIR / "export.log")
        res["meta"]["export"] = exported
        print(f"  {exported['export']}", flush=True)
        ctx = Ctx(args.quick, corpus, corpus_dir, tmp, Path(exported["model_dir"]), variants, server, client,
                  service=args.service_variant)
        for name in names:
            res["benchmarks"][name] = run_one(ctx, name)
            finish(res, ctx, t_all)
            write(args.out, res)
    except KeyboardInterrupt:
        print("\ninterrupted: stacks stopped; partial results written", file=sys.stderr)
        write(args.out, res)
        return 130
    finally:
        close_clients()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.publish:
        res["plot"] = str(report.PLOT.relative_to(PROJECT_ROOT)) if plot(res, report.PLOT) else None
    else:
        made = plot(res, args.out.with_suffix(".png"))
        res["plot"] = str(made) if made else None
    write(args.out, res)
    report.print_summary(res)
    if args.publish:
        print(f"README.md {'updated' if report.update_readme(res) else 'already up to date'}")
    failed = [n for n, r in res["benchmarks"].items() if r["status"] == "error"]
    for n in failed:
        print(f"  FAILED {n}: {res['benchmarks'][n]['error']}")
    print(f"\nresults: {args.out}" + (f"; plot: {res['plot']}" if res["plot"] else ""))
    return 1 if failed else 0


def run_one(ctx: Ctx, name: str) -> dict:
    """One benchmark, timed, with the share of the CPU other processes used meanwhile."""
    f = Figures()
    load0 = os.getloadavg()[0]
    cpu0 = cpu_snapshot()
    t0 = time.perf_counter()
    status, err = "ok", None
    print(f"\n-- {name}: {summary(name)}", flush=True)
    try:
        BENCHMARKS[name].run(ctx, f)
    except KeyboardInterrupt:
        raise
    except Skip as exc:
        status, err = "skipped", str(exc)
        print(f"  SKIP {name}: {exc}")
    except Exception as exc:
        status, err = "error", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    ctx.results[name] = f
    secs = time.perf_counter() - t0
    cpu1 = cpu_snapshot()
    ncpu = os.cpu_count() or 1
    foreign = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (secs * ncpu) * 100
    print_figures(name, f, secs, foreign, status, err)
    return {"status": status, "error": err, "seconds": round(secs, 1), "loadavg_1m_before": load0,
            "foreign_cpu_pct": round(foreign, 1), **f.as_json()}


def finish(res: dict, ctx: Ctx, t_all: float) -> None:
    """What is derived from the figures so far: variant statuses, the fastest, the targets."""
    inp = ctx.results.get("inprocess")
    res["variants"] = [{"name": v.name, "runtime": v.runtime, "precision": v.precision, "resize": v.resize,
                        "status": ("skipped" if inp.variants.get(v.name) is None or inp.variants[v.name].skipped
                                   else "ok") if inp else ("ok" if v.unsupported() is None else "skipped"),
                        "reason": (inp.variants[v.name].skipped if inp and v.name in inp.variants
                                   else v.unsupported())}
                       for v in ctx.variants]
    res["meta"]["fastest_variant"] = ctx.fastest().name if inp else None
    res["meta"]["total_seconds"] = round(time.perf_counter() - t_all, 1)
    res["meta"]["loadavg_end"] = os.getloadavg()
    res["targets"] = report.check_targets(res)


def print_figures(name: str, f: Figures, secs: float, foreign: float, status: str, err: str | None) -> None:
    busy = f"other processes used {foreign:.0f} % of the CPUs" + (": NOISY" if foreign >= 10 else "")
    print(f"\n== {name}: {secs:.0f} s; {busy}" + ("" if status == "ok" else f" — {status.upper()}: {err}"))
    groups = [("", f)] + [(f"{v}  ", g) for v, g in f.variants.items() if g.skipped is None]
    for prefix, g in groups:
        for key, value, unit in g.rows:
            print(f"  {prefix}{key:<32} {report._fmt(value):>12} {unit}")
        for n in g.notes:
            print(f"  {prefix}note: {n}")
    sys.stdout.flush()


def write(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    tmp.replace(out)


def meta(args: argparse.Namespace, names: list[str], corpus, cores: list[int], server: list[int],  # noqa: ANN001
         client: list[int]) -> dict:
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": _cpu_model(), "cores": cores,
            "server_cores": server, "client_cores": client, "python": platform.python_version(), "git": _git_rev(),
            "quick": args.quick, "benchmarks": names, "corpus": corpus.describe(),
            "corpus_synthetic": corpus.synthetic, "service_variant": args.service_variant,
            "model": os.environ.get("PINFER_BENCH_MODEL_DIR") or "random-init ResNet-18 (seed 0)",
            "inherited_pinfer_env": {k: v for k, v in os.environ.items() if k.startswith("PINFER_")},
            "loadavg_start": os.getloadavg()}


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this process + its waited-for
    descendants). The difference over a benchmark is what *other* work on the machine used."""
    busy = 0.0
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return "?"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"
