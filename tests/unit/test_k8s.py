"""Static checks of deploy/k8s (no cluster runs here).

Every built-in object is validated against the Kubernetes OpenAPI schemas that the
``kubernetes-validate`` package ships (offline); the KEDA objects against the closed schema in
``tests/fixtures/keda_schema.py``. Then the manifests are checked against the code they must agree
with: the queues KEDA watches are the ones in ``shared/keys.py``, the probes name routes the Flask
app really serves, the ConfigMap holds only real settings, worker pods are Guaranteed QoS with whole
cores, and the grace periods cover a batch and a long-poll.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared import keys
from shared.settings import Settings
from tests.fixtures.keda_schema import AUTH_PARAMETERS, METRICS_API_AUTH, SCHEMAS, TRIGGER_METADATA

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: The oldest Kubernetes minor pinfer's manifests target (policy/v1 PDB, autoscaling/v2 HPA, batch/v1).
K8S_VERSION = "1.29"


def _render() -> list[dict]:
    """``kubectl kustomize deploy/k8s`` when kubectl is installed; otherwise the listed resources with
    the kustomization's namespace applied (all this kustomization does besides a label and the image)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], check=True, capture_output=True, text=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kust["resources"]:
        for d in yaml.safe_load_all((K8S / name).read_text()):
            if d:
                if d["kind"] != "Namespace":
                    d["metadata"]["namespace"] = kust["namespace"]
                docs.append(d)
    return docs


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return _render()


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(obj)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def configmap_env(objs) -> dict[str, str]:
    return one(objs, "ConfigMap", "pinfer-settings")["data"]


# ------------------------------------------------------------------------------------------ schemas
def test_every_builtin_object_validates_against_the_kubernetes_schemas(objs):
    builtin = [o for o in objs if not o["apiVersion"].startswith("keda.sh/")]
    assert {o["kind"] for o in builtin} >= {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
                                           "HorizontalPodAutoscaler", "StatefulSet", "Job"}
    for o in builtin:
        # strict: unknown fields (typos) are errors too. Raises ValidationError with the path.
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field(objs):
    """Guard against a validator that accepts anything (e.g. no schema found for the version)."""
    bad = yaml.safe_load(yaml.safe_dump(one(objs, "Deployment", "pinfer-worker")))
    pod_spec(bad)["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(one(objs, "Deployment", "pinfer-worker")))
    containers(bad)[0]["resources"]["limits"]["cpu"] = ["1"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_keda_objects_match_their_schema(objs):
    keda = [o for o in objs if o["apiVersion"].startswith("keda.sh/")]
    assert sorted(o["kind"] for o in keda) == ["ScaledObject", "TriggerAuthentication", "TriggerAuthentication"]
    auth = {o["metadata"]["name"]: o for o in keda if o["kind"] == "TriggerAuthentication"}
    for o in keda:
        jsonschema.validate(o, SCHEMAS[o["kind"]])
        for t in o["spec"].get("triggers", []):
            unknown = set(t["metadata"]) - TRIGGER_METADATA[t["type"]]
            assert not unknown, f"trigger {t.get('name')}: {t['type']} has no metadata {sorted(unknown)}"
            # The parameters its TriggerAuthentication hands over are ones this trigger type takes,
            # and the Secrets they come from exist with that key.
            if "authenticationRef" in t:
                ref = auth[t["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
                params = {r["parameter"] for r in ref}
                assert params <= AUTH_PARAMETERS[t["type"]], (t.get("name"), params)
                for r in ref:
                    assert r["key"] in one(objs, "Secret", r["name"])["stringData"], r
                if t["type"] == "metrics-api":
                    assert METRICS_API_AUTH[t["metadata"]["authMode"]] <= params, t.get("name")
    broken = yaml.safe_load(yaml.safe_dump(one(objs, "ScaledObject", "pinfer-worker")))
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 16     # KEDA metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMAS["ScaledObject"])
    broken = yaml.safe_load(yaml.safe_dump(one(objs, "ScaledObject", "pinfer-worker")))
    broken["spec"]["triggers"][-1]["metadata"]["authMode"] = "Bearer"   # KEDA's modes are case-sensitive
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMAS["ScaledObject"])
    broken = yaml.safe_load(yaml.safe_dump(auth["pinfer-keda-api"]))
    broken["spec"]["secretTargetRef"][0]["parameter"] = "bearerToken"  # not a metrics-api parameter
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMAS["TriggerAuthentication"])


# ------------------------------------------------------------------------------------ API keys
def _api_keys_mount(objs) -> tuple[str, dict]:
    """(PINFER_API_KEYS_FILE of the API pods, the Secret holding that file)."""
    api = one(objs, "Deployment", "pinfer-api")
    c = next(c for c in containers(api, init=False) if c["name"] == "api")
    path = {e["name"]: e.get("value") for e in c.get("env", [])}["PINFER_API_KEYS_FILE"]
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    # A whole-volume mount, not subPath: Secret updates (added or revoked keys) reach running pods,
    # and the API re-reads the file when it changes.
    assert "subPath" not in mount
    vol = next(v for v in pod_spec(api)["volumes"] if v["name"] == mount["name"])
    secret = one(objs, "Secret", vol["secret"]["secretName"])
    assert path.removeprefix(mount["mountPath"].rstrip("/") + "/") in secret["stringData"]
    return path, secret


def test_api_keys_are_on_in_the_cluster(objs):
    path, secret = _api_keys_mount(objs)
    key = path.rsplit("/", 1)[1]
    # Every line is `<name> <sha256 hex>`, as api/auth.py reads it.
    lines = [ln for ln in secret["stringData"][key].splitlines() if ln.strip()]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9._-]+ [0-9a-f]{64}", ln) for ln in lines), lines
    # The keys file is mounted into the API pods only; the workers and the model Job never see it.
    for name, kind in (("pinfer-worker", "Deployment"), ("pinfer-model", "Job")):
        vols = {v.get("secret", {}).get("secretName") for v in pod_spec(one(objs, kind, name)).get("volumes", [])}
        assert secret["metadata"]["name"] not in vols


def test_keda_reads_stats_with_its_own_key_that_the_api_accepts(objs, make_app, settings, tmp_path):
    """The in-flight trigger authenticates with a key whose hash is in the API's keys file: the API
    built from these very manifests answers KEDA's request with 200, and an anonymous one with 401."""
    so = one(objs, "ScaledObject", "pinfer-worker")
    trigger = next(t for t in so["spec"]["triggers"] if t["type"] == "metrics-api")
    assert trigger["metadata"]["authMode"] == "bearer"
    ta = one(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    ref = next(r for r in ta["spec"]["secretTargetRef"] if r["parameter"] == "token")
    token_secret = one(objs, "Secret", ref["name"])
    token = token_secret["stringData"][ref["key"]]
    path, keys_secret = _api_keys_mount(objs)
    assert token_secret is not keys_secret, "the raw key must not be mounted into the API pods"
    api = one(objs, "Deployment", "pinfer-api")
    assert ref["name"] not in {v.get("secret", {}).get("secretName") for v in pod_spec(api)["volumes"]}
    assert ref["name"] not in {e.get("secretRef", {}).get("name") for c in containers(api) for e in c.get("envFrom", [])}
    keys_file = tmp_path / "keys"
    keys_file.write_text(keys_secret["stringData"][path.rsplit("/", 1)[1]])
    client = make_app(settings.replace(api_keys_file=str(keys_file))).test_client()
    url = trigger["metadata"]["url"]
    route = url[url.index("/", len("http://")):]
    assert client.get(route).status_code == 401
    resp = client.get(route, headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    section, field = trigger["metadata"]["valueLocation"].split(".")
    assert isinstance(resp.get_json()[section][field], int)


# ------------------------------------------------------------------------------------ autoscaling
def test_keda_scales_the_worker_deployment_on_both_queues_and_in_flight_work(objs, store):
    so = one(objs, "ScaledObject", "pinfer-worker")
    target = so["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    one(objs, "Deployment", target["name"])
    lists = {t["metadata"]["listName"] for t in so["spec"]["triggers"] if t["type"].startswith("redis")}
    # kombu's Redis transport keeps each queue (priority 0) in a list named after the queue.
    assert lists == {keys.QUEUE_INTERACTIVE, keys.QUEUE_BULK}
    in_flight = [t for t in so["spec"]["triggers"] if t["type"] == "metrics-api"]
    assert len(in_flight) == 1
    meta = in_flight[0]["metadata"]
    # The value it reads exists in what /v1/stats returns (a number), and the URL names that route
    # on the API Service's port.
    section, field = meta["valueLocation"].split(".")
    assert section == "queues" and isinstance(store.queue_depths()[field], int)
    svc = one(objs, "Service", "pinfer-api")
    ns = svc["metadata"]["namespace"]
    port = svc["spec"]["ports"][0]["port"]
    assert meta["url"] == f"http://pinfer-api.{ns}.svc.cluster.local:{port}/v1/stats"
    lo, hi = so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
    assert 1 <= lo < hi


def test_keda_reaches_redis_at_the_address_the_app_uses(objs):
    so = one(objs, "ScaledObject", "pinfer-worker")
    svc = one(objs, "Service", "pinfer-redis")
    addr = f"pinfer-redis.{svc['metadata']['namespace']}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    url = one(objs, "Secret", "pinfer-secrets")["stringData"]["PINFER_REDIS_URL"]
    password = one(objs, "Secret", "pinfer-secrets")["stringData"]["REDIS_PASSWORD"]
    assert url == f"redis://:{password}@pinfer-redis:{svc['spec']['ports'][0]['port']}/0"
    auth = {a["metadata"]["name"]: a for a in objs if a["kind"] == "TriggerAuthentication"}
    for t in so["spec"]["triggers"]:
        if t["type"] == "redis":
            assert t["metadata"]["address"] == addr and t["metadata"]["databaseIndex"] == "0"
            ref = auth[t["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
            assert {"parameter": "password", "name": "pinfer-secrets", "key": "REDIS_PASSWORD"} in ref


def test_api_hpa_scales_the_api_on_cpu_relative_to_its_request(objs):
    hpa = one(objs, "HorizontalPodAutoscaler", "pinfer-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pinfer-api"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    api = one(objs, "Deployment", "pinfer-api")
    assert all("cpu" in c["resources"]["requests"] for c in containers(api, init=False))


# ------------------------------------------------------------------------------------ probes
def _get_routes(app) -> set[str]:
    return {r.rule for r in app.url_map.iter_rules() if "GET" in r.methods and "<" not in r.rule}


def test_probes_name_routes_the_api_serves_and_ports_it_declares(objs, app):
    routes = _get_routes(app)
    api = one(objs, "Deployment", "pinfer-api")
    probed = set()
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in containers(obj):
            ports = {p["name"] for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = c.get(kind, {}).get("httpGet")
                if get:
                    assert get["path"] in routes, f"{obj['metadata']['name']} {kind}: no route {get['path']}"
                    assert get["port"] in ports
                    probed.add((obj["metadata"]["name"], kind, get["path"]))
    assert ("pinfer-api", "livenessProbe", "/healthz") in probed
    assert ("pinfer-api", "readinessProbe", "/readyz") in probed
    # And the routes answer as the probes expect on a process with Redis but no worker yet.
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert api["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == Settings().port


def test_services_and_budgets_select_pods_that_exist(objs):
    pod_labels = [o["spec"]["template"]["metadata"]["labels"] for o in objs
                  if o["kind"] in ("Deployment", "StatefulSet")]
    for o in objs:
        if o["kind"] == "Service":
            sel = o["spec"]["selector"]
        elif o["kind"] == "PodDisruptionBudget":
            sel = o["spec"]["selector"]["matchLabels"]
        else:
            continue
        assert any(sel.items() <= labels.items() for labels in pod_labels), o["metadata"]["name"]
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "PodDisruptionBudget"} == {"pinfer-api",
                                                                                         "pinfer-worker"}


# ------------------------------------------------------------------------------------ workers
def test_worker_pods_are_guaranteed_qos_with_whole_cores(objs):
    """Guaranteed QoS needs requests == limits for CPU and memory in every container, init containers
    included; the static CPU manager gives exclusive cores only to integer CPU counts."""
    worker = one(objs, "Deployment", "pinfer-worker")
    for c in containers(worker):
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert set(req) == set(lim) == {"cpu", "memory"}, c["name"]
        assert req == lim, c["name"]
        assert isinstance(req["cpu"], str) and req["cpu"].isdigit() and int(req["cpu"]) >= 1, c["name"]
    main = next(c for c in containers(worker, init=False) if c["name"] == "worker")
    env = configmap_env(objs)
    # One Celery process per whole core of the pod; no core leases inside a cluster.
    assert int(env["PINFER_WORKERS"]) == int(main["resources"]["requests"]["cpu"])
    assert env["PINFER_CORE_LEASE"] == "0" and env["PINFER_CORES"] == ""


def test_grace_periods_cover_a_batch_and_a_long_poll(objs):
    s = Settings.from_env(configmap_env(objs))
    worker = pod_spec(one(objs, "Deployment", "pinfer-worker"))
    assert worker["terminationGracePeriodSeconds"] > s.batch_time_limit_s + 10
    api = pod_spec(one(objs, "Deployment", "pinfer-api"))
    pre_stop = api["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    graceful = max(30, int(s.max_wait_s) + 5)           # pinfer/gunicorn_conf.py
    assert api["terminationGracePeriodSeconds"] >= graceful + int(pre_stop[1])


def test_config_names_only_real_settings_and_is_valid(objs):
    known = {f.metadata["env"] for f in Settings.__dataclass_fields__.values()}
    env = configmap_env(objs)
    assert set(env) <= known
    secret = one(objs, "Secret", "pinfer-secrets")["stringData"]
    assert {k for k in secret if k.startswith("PINFER_")} <= known
    Settings.from_env({**env, **secret})               # types and cross-checks (validate())
    model_dir = env["PINFER_MODEL_DIR"]
    for name in ("pinfer-worker",):
        mounts = {m["mountPath"] for c in containers(one(objs, "Deployment", name)) for m in c["volumeMounts"]}
        assert model_dir in mounts
    job = one(objs, "Job", "pinfer-model")
    assert pod_spec(job)["containers"][0]["args"] == ["model"]
    assert {v["claimName"] for v in [vol["persistentVolumeClaim"] for vol in pod_spec(job)["volumes"]]} == \
        {vol["persistentVolumeClaim"]["claimName"] for vol in pod_spec(one(objs, "Deployment", "pinfer-worker"))["volumes"]}


def test_entrypoint_roles_exist(objs):
    roles = (ROOT / "deploy" / "docker-entrypoint.sh").read_text()
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            for c in containers(o, init=False):
                assert f"\n    {c['args'][0]})" in roles, c["args"]


def test_redis_keeps_what_it_accepted(objs):
    args = pod_spec(one(objs, "StatefulSet", "pinfer-redis"))["containers"][0]["args"]
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["--appendonly"] == "yes" and opts["--maxmemory-policy"] == "noeviction"
    assert opts["--maxmemory"] != "0"
