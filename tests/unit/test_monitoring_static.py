"""The compose `monitoring` profile, checked without Docker: Prometheus and Grafana files load, point
at services and ports that exist, and every query names a metric the code really exposes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import fakeredis
import pytest
from prometheus_client import REGISTRY

from api.metrics import RedisCollector
from shared.settings import Settings
from shared.store import Store

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
yaml = pytest.importorskip("yaml")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
            "gauge": ("",), "unknown": ("",), "summary": ("_sum", "_count"), "stateset": ("",)}


def exposed_names() -> set[str]:
    """Sample names the API and the workers expose, from the registries themselves."""
    import worker.metrics  # noqa: F401  (registers the worker's families in this process)

    names: set[str] = set()
    store = Store(Settings(), fakeredis.FakeRedis(decode_responses=True), fakeredis.FakeRedis())
    families = list(REGISTRY.collect()) + list(RedisCollector(store).collect())
    worker.metrics.watch_state(lambda: "READY")
    families += list(REGISTRY.collect())
    for fam in families:
        if fam.name.startswith("pinfer_"):
            names.update(fam.name + s for s in SUFFIXES[fam.type])
    return names


def exposed_families() -> set[str]:
    """The names an operator reads: counters with `_total`, histograms without their suffixes."""
    names = exposed_names()
    return ({n for n in names if not n.endswith(("_bucket", "_sum", "_count"))}
            | {n.removesuffix("_bucket") for n in names if n.endswith("_bucket")})


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bpinfer_[a-z0-9_]+", expr))


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pinfer.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_grafana_query_names_an_exposed_metric():
    names = exposed_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= names, f"not exposed by the code: {sorted(used - names)}"
    # what the issue asks the dashboard to show
    for needed in ("pinfer_worker_images_total", "pinfer_queue_messages", "pinfer_worker_batch_size_bucket",
                   "pinfer_worker_state", "pinfer_worker_end_to_end_seconds_bucket",
                   "pinfer_worker_inference_seconds_bucket", "pinfer_worker_preprocess_seconds_bucket",
                   "pinfer_worker_queue_wait_seconds_bucket"):
        assert needed in used, needed
    assert any("histogram_quantile(0.99" in e for e in exprs)


def test_exposed_names_follow_prometheus_conventions():
    for name in exposed_names():
        assert re.fullmatch(r"pinfer_[a-z0-9_]+", name)
        assert not name.endswith(("_ms", "_milliseconds")), f"{name}: durations in seconds"


def test_grafana_dashboard_and_provisioning_load():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pinfer.json").read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert all(p["datasource"]["uid"] == source["uid"] for p in dash["panels"])
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "pinfer.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[path] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


def test_prometheus_scrapes_the_compose_services_on_their_real_ports():
    conf = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    targets = {}
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                targets[name] = sd["port"]
    assert targets == {"api": 8000, "worker": Settings().metrics_port}
    assert services["api"]["environment"]["PINFER_PORT"] == "8000"
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]



def test_the_metrics_table_documents_every_exposed_family():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(pinfer_[a-z0-9_]+)` \|", doc, re.M))
    assert documented == exposed_families()
