"""Static checks of the deployment files (no Docker engine needed).

docker-compose.yml, deploy/nginx.conf, pinfer/gunicorn_conf.py, deploy/Dockerfile, .dockerignore,
deploy/docker-entrypoint.sh, the Makefile and pyproject.toml are checked against the settings they must agree with (upload limit,
long-poll length, thread counts) and against the topology rules: only nginx is published, scalable
services have no fixed names or ports, every service is health-gated. `nginx -t` runs on the
loopback rendering of the real nginx.conf (skipped without nginx, except in CI).
"""
from __future__ import annotations

import os
import platform
import re
import runpy
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared.settings import Settings
from pinfer.topology import nginx_binary, nginx_test, render_nginx_conf

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
GUNICORN_CONF = ROOT / "pinfer" / "gunicorn_conf.py"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
DEPLOY_README = ROOT / "deploy" / "README.md"
MAKEFILE = ROOT / "Makefile"
PYPROJECT = ROOT / "pyproject.toml"
DEFAULTS = Settings()
IN_CI = os.environ.get("CI", "").lower() == "true"


# --------------------------------------------------------------------------------------- helpers
def _tokens(text: str):
    """nginx config tokens: words, quoted strings (unquoted), `{`, `}`, `;`; comments dropped."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};":
            yield c
            i += 1
        elif c in "'\"":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            yield text[i + 1:j]
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "{};":
                j += 1
            yield text[i:j]
            i = j


def parse_nginx(text: str) -> list:
    """[(name, args, children | None)], nested for blocks."""
    stack: list[list] = [[]]
    words: list[str] = []
    for tok in _tokens(text):
        if tok == ";":
            stack[-1].append((words[0], words[1:], None))
            words = []
        elif tok == "{":
            block: list = []
            stack[-1].append((words[0], words[1:], block))
            stack.append(block)
            words = []
        elif tok == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(tok)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return stack[0]


def find(block: list, name: str, args_prefix: tuple = ()) -> list:
    return [d for d in block if d[0] == name and tuple(d[1][:len(args_prefix)]) == args_prefix]


def one(block: list, name: str, *args_prefix: str):
    found = find(block, name, args_prefix)
    assert len(found) == 1, f"expected one `{name} {' '.join(args_prefix)}`, found {len(found)}"
    return found[0]


def nginx_size(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, f"not an nginx size: {value}"
    return int(m[1]) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m[2].lower()]


def nginx_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)?", value)
    assert parts and "".join(a + b for a, b in parts) == value, f"not an nginx time: {value}"
    return sum(int(a) * units[b or "s"] for a, b in parts)


def compose_seconds(value: str) -> float:
    return sum(int(a) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[b]
               for a, b in re.findall(r"(\d+)(ms|s|m|h)", value))


@pytest.fixture(scope="module")
def compose() -> dict:
    # pyyaml comes with the `test` extra. Until an environment has it, only the compose checks are
    # skipped (never in CI, where a missing parser must not hide them).
    try:
        import yaml
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("pyyaml not installed (pip install -e '.[test]')")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def nginx() -> list:
    return parse_nginx(NGINX_CONF.read_text())


@pytest.fixture(scope="module")
def nginx_server(nginx) -> list:
    http = one(nginx, "http")[2]
    return one(http, "server")[2]


def _default_services(services: dict) -> dict:
    """Services `docker compose up` starts (no `profiles`)."""
    return {name: svc for name, svc in services.items() if not svc.get("profiles")}


def _env(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _depends(svc: dict) -> dict:
    deps = svc.get("depends_on") or {}
    return {d: {} for d in deps} if isinstance(deps, list) else deps


def _has_healthcheck(svc: dict) -> bool:
    hc = svc.get("healthcheck")
    return bool(hc) and not hc.get("disable") and bool(hc.get("test"))


def _healthcheck_cmd(svc: dict) -> str:
    test = svc["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


# --------------------------------------------------------------------------------------- compose
def test_compose_has_core_services(services):
    for name in ("redis", "model", "api", "worker", "nginx"):
        assert name in services, f"service {name} missing"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_scalable_services_have_no_fixed_name_or_host_port(services, name):
    svc = services[name]
    assert "container_name" not in svc, f"{name}: container_name prevents --scale"
    assert not svc.get("ports"), f"{name}: must not publish host ports (nginx is the entry point)"


def test_redis_is_not_published(services):
    assert not services["redis"].get("ports")
    assert not services["redis"].get("network_mode"), "redis must stay on the compose network"


def test_only_nginx_publishes_ports(services):
    published = {name for name, svc in _default_services(services).items() if svc.get("ports")}
    assert published == {"nginx"}
    assert services["nginx"]["ports"] == ["${PINFER_PORT:-8000}:80"]
    # Optional (profile) services may publish, but only on the host's loopback.
    for name, svc in services.items():
        if svc.get("profiles"):
            for port in svc.get("ports") or []:
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_every_service_is_health_gated(services):
    completed_deps = {dep for svc in services.values() for dep, spec in _depends(svc).items()
                      if spec.get("condition") == "service_completed_successfully"}
    for name, svc in services.items():
        one_shot = svc.get("restart", "no") == "no" and name in completed_deps
        assert _has_healthcheck(svc) or one_shot, f"{name}: no healthcheck and not a gated one-shot"
        for dep, spec in _depends(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec.get("condition")
            assert cond in ("service_healthy", "service_completed_successfully"), \
                f"{name} -> {dep}: depends_on without a health/completion condition"
            if cond == "service_healthy":
                assert _has_healthcheck(services[dep]), f"{name} waits for {dep}, which has no healthcheck"


def test_redis_persists_and_never_evicts(services):
    redis = services["redis"]
    cmd = redis["command"]
    cmd = cmd if isinstance(cmd, list) else cmd.split()
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]), "redis data needs a volume"
    assert "redis-cli" in _healthcheck_cmd(redis)


def test_worker_topology(services):
    worker = services["worker"]
    env = _env(worker)
    assert env["PINFER_WORKERS"] == "1"
    assert env["PINFER_CORE_LEASE"].lower() in ("1", "true", "yes", "on")
    # The lease key is the kernel's boot id: no host file is bind-mounted (Docker turns a missing
    # bind source into an empty directory, and Docker Desktop has no /etc/machine-id at all).
    assert not [v for v in worker["volumes"] if "machine-id" in str(v)], worker["volumes"]
    assert "HOST_MACHINE_ID_FILE" not in COMPOSE.read_text()
    # A worker left unpinned runs one thread (worker/threads.py honours OMP_NUM_THREADS).
    assert env["OMP_NUM_THREADS"] == "1"
    assert worker.get("init") is True
    assert compose_seconds(worker["stop_grace_period"]) >= 60
    assert "pinfer worker --check" in _healthcheck_cmd(worker)
    assert _depends(worker)["model"]["condition"] == "service_completed_successfully"
    assert _depends(worker)["redis"]["condition"] == "service_healthy"
    assert any(str(v).startswith("model:/models") for v in worker["volumes"])


def test_model_is_a_one_shot_into_the_model_volume(compose, services):
    model = services["model"]
    assert model.get("restart") == "no"
    assert "model:/models" in model["volumes"]
    assert "model" in compose["volumes"] and "redis-data" in compose["volumes"]
    assert model.get("init") is True, "tini forwards signals to the export and reaps its children"


def _mount_targets(svc: dict) -> list[str]:
    out = []
    for v in svc.get("volumes") or []:
        out.append(v["target"] if isinstance(v, dict) else str(v).split(":")[1])
    return out


def test_export_weights_names_a_file_the_model_service_can_see(services):
    """EXPORT_WEIGHTS is a path inside the container: compose must not take it from `.env` unless
    it also mounts that path (with --weights given, the random-init fallback is skipped and the
    model service would exit 2, so the workers would never start)."""
    model = services["model"]
    value = _env(model).get("EXPORT_WEIGHTS")
    if value is not None:
        assert "${" not in str(value), "EXPORT_WEIGHTS from the host names a path nothing mounts"
        assert any(str(value).startswith(t.rstrip("/") + "/") for t in _mount_targets(model)), value
    # The documented form mounts the very path it exports from.
    m = re.search(r"-e EXPORT_WEIGHTS=(\S+).*?-v \"?[^\s:\"]+:([^\s:\"]+)", DEPLOY_README.read_text(), re.S)
    assert m, "deploy/README.md must show `docker compose run -e EXPORT_WEIGHTS=... -v ...`"
    assert m[1] == m[2], f"the documented run exports {m[1]} but mounts {m[2]}"


def test_api_does_not_mount_the_model(services):
    assert not [t for t in _mount_targets(services["api"]) if t.startswith("/models")]


# Settings compose does not pass through from the shell / `.env`: fixed by the topology or for tests
# only. deploy/README.md must name each of them.
NOT_PASSED_THROUGH = {
    "PINFER_REDIS_URL",        # always the compose service `redis`
    "PINFER_MODEL_DIR",        # always the volume `model`
    "PINFER_PORT",             # the API listens on 8000 inside; the host's value picks nginx's port
    "PINFER_WORKERS",          # one worker process per container: scale with --scale worker=N
    "PINFER_CORE_LEASE",       # replicas share the host's cores through leases
    "PINFER_API_KEYS_FILE",    # always on for the api: the secret `api-keys` (API_KEYS_FILE picks the host file)
    "PINFER_CHAOS_KILL_MARKER",  # tests only
    "PINFER_DATA_DIR",         # the private Redis of `pinfer up`; compose has its `redis` service
    "PINFER_REDIS_MAXMEMORY",  # likewise (compose: REDIS_MAXMEMORY)
    "PINFER_METRICS_PORT",     # each worker container serves 9464, where Prometheus scrapes
    "PINFER_METRICS_DIR",      # a temporary folder per API container
}


def test_compose_passes_every_setting(compose, services):
    """Every setting reaches the containers that read it, or is named as not passed through, so a
    new setting cannot be silently dropped between `.env` and the code."""
    settings = {f.metadata["env"] for f in Settings.__dataclass_fields__.values()}
    common = compose["x-common-env"]
    pinfer_services = [n for n, s in services.items() if s.get("image") == services["api"]["image"]]
    assert set(pinfer_services) >= {"model", "api", "worker"}
    passed = set()
    for name in pinfer_services:
        env = _env(services[name])
        assert set(common) <= set(env), f"{name} does not merge x-common-env"
        for var, value in env.items():
            if var in settings and str(value) == f"${{{var}:-}}":
                passed.add(var)
    forgotten = settings - passed - NOT_PASSED_THROUGH
    assert not forgotten, f"settings compose drops (add them to x-common-env): {sorted(forgotten)}"
    assert not passed & NOT_PASSED_THROUGH
    assert NOT_PASSED_THROUGH <= settings, "a name here is no longer a setting"
    readme = DEPLOY_README.read_text()
    undocumented = {v for v in NOT_PASSED_THROUGH if f"`{v}`" not in readme}
    assert not undocumented, f"deploy/README.md must say why these are not passed: {undocumented}"
    # Settings both API and workers read are shared, not set per service.
    for var in ("PINFER_MAX_REQUEST_BYTES", "PINFER_INTERACTIVE_WINDOW_S", "PINFER_MAX_PENDING_IMAGES"):
        assert common.get(var) == f"${{{var}:-}}", var


# Average size of a queued upload the default Redis bound is sized for (deploy/README.md).
AVERAGE_UPLOAD = 150 * 1024


def _redis_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)(b|kb|mb|gb)?", value.lower())
    assert m, f"not a Redis memory size: {value}"
    return int(m[1]) * {None: 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3}[m[2]]


def test_redis_memory_is_bounded_by_default_for_the_pending_bound(services):
    cmd = services["redis"]["command"]
    value = str(cmd[cmd.index("--maxmemory") + 1])
    m = re.fullmatch(r"\$\{REDIS_MAXMEMORY:-([^}]*)\}", value)
    assert m, f"--maxmemory must stay overridable with REDIS_MAXMEMORY: {value}"
    default = _redis_bytes(m[1])
    assert default > 0, "no memory bound: the OOM killer, not the API's 503/429, would act"
    assert default >= DEFAULTS.max_pending_images * AVERAGE_UPLOAD, \
        "the default bound does not hold PINFER_MAX_PENDING_IMAGES average uploads"
    assert "vm.overcommit_memory" in DEPLOY_README.read_text()


def test_api_replicas_and_port(services):
    api = services["api"]
    assert api.get("deploy", {}).get("replicas", api.get("scale", 1)) >= 2
    # nginx's upstream is api:8000, whatever port the host publishes.
    assert _env(api)["PINFER_PORT"] == "8000"
    assert "/healthz" in _healthcheck_cmd(api)
    # gunicorn's graceful_timeout (max_wait_s + 5) must fit in the stop grace period.
    assert compose_seconds(api["stop_grace_period"]) > DEFAULTS.max_wait_s + 5


def test_pinfer_images_share_one_build_with_cpu_torch(services):
    for name in ("model", "api", "worker"):
        build = services[name]["build"]
        assert build["dockerfile"] == "deploy/Dockerfile"
        assert "download.pytorch.org/whl/cpu" in build["args"]["TORCH_INDEX_URL"]
    assert len({services[n]["image"] for n in ("model", "api", "worker")}) == 1


def test_api_keys_are_always_on_in_compose(compose, services):
    """Issue 9: the compose stack serves others, so API keys are on with no switch to turn them off:
    the api containers get the keys file as a secret and PINFER_API_KEYS_FILE names it."""
    api = services["api"]
    path = _env(api)["PINFER_API_KEYS_FILE"]
    m = re.fullmatch(r"/run/secrets/([\w.-]+)", path)
    assert m, f"PINFER_API_KEYS_FILE must name the api's compose secret, not {path!r}"
    assert m[1] in api["secrets"]
    source = compose["secrets"][m[1]]["file"]
    d = re.fullmatch(r"\$\{API_KEYS_FILE:-([^}]+)\}", source)
    assert d, f"the keys file must default to a path and be overridable with API_KEYS_FILE: {source}"
    default = d[1].removeprefix("./")
    # The file a user creates there (hashes of real keys) is never committed nor sent to `docker build`.
    assert f"/{default}" in (ROOT / ".gitignore").read_text().splitlines()
    assert default in DOCKERIGNORE.read_text().splitlines()
    # Only the API reads it: no other service gets the secret or the setting.
    for name, svc in services.items():
        if name != "api":
            assert m[1] not in (svc.get("secrets") or []), name
            assert "PINFER_API_KEYS_FILE" not in _env(svc), name
    # What to run first is written where compose users look.
    readme = DEPLOY_README.read_text()
    assert "pinfer api-key" in readme and default in readme


def test_compose_pinfer_variables_are_real_settings(services):
    known = {f.metadata["env"] for f in Settings.__dataclass_fields__.values()}
    for name, svc in services.items():
        for var in _env(svc):
            if var.startswith("PINFER_"):
                assert var in known, f"{name}: {var} is not a setting of shared/settings.py"


def test_nginx_service_uses_deploy_conf(services):
    nginx = services["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert _depends(nginx)["api"]["condition"] == "service_healthy"
    assert "/nginx-health" in _healthcheck_cmd(nginx)


def test_nginx_stop_lets_long_polls_finish(services, nginx):
    """Docker's default 10 s would cut 30 s long-polls; nginx's own graceful stop is bounded too."""
    shutdown = nginx_seconds(one(nginx, "worker_shutdown_timeout")[1][0])
    assert shutdown > DEFAULTS.max_wait_s
    assert compose_seconds(services["nginx"]["stop_grace_period"]) > shutdown


def test_nginx_resolves_api_at_run_time(services, nginx):
    """A crash restart or reboot gives replicas new addresses: nginx must look `api` up again."""
    m = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?-alpine", services["nginx"]["image"])
    assert m and (int(m[1]), int(m[2]), int(m[3] or 99)) >= (1, 27, 3), "`resolve` needs nginx >= 1.27.3"
    http = one(nginx, "http")[2]
    resolver = one(http, "resolver")[1]
    assert resolver[0] == "127.0.0.11", "Docker's embedded DNS"
    assert any(a.startswith("valid=") for a in resolver)
    upstream = one(http, "upstream", "pinfer_api")[2]
    assert "resolve" in one(upstream, "server", "api:8000")[1]
    assert find(upstream, "zone"), "`resolve` needs a shared zone"


# --------------------------------------------------------------------------------------- nginx
def test_nginx_body_limit_covers_upload_limit(nginx_server):
    limit = nginx_size(one(nginx_server, "client_max_body_size")[1][0])
    assert limit >= DEFAULTS.max_upload_bytes
    bulk = [loc for loc in find(nginx_server, "location") if "images" in " ".join(loc[1])]
    assert bulk, "no bulk-upload location"
    assert nginx_size(one(bulk[0][2], "client_max_body_size")[1][0]) > limit


def test_nginx_timeouts_outlast_long_polls(nginx_server):
    read = nginx_seconds(one(nginx_server, "proxy_read_timeout")[1][0])
    assert read > DEFAULTS.max_wait_s
    assert nginx_seconds(one(nginx_server, "proxy_connect_timeout")[1][0]) <= 5


def test_nginx_never_retries_post(nginx_server):
    conditions = one(nginx_server, "proxy_next_upstream")[1]
    assert "non_idempotent" not in conditions
    assert {"error", "timeout"} <= set(conditions)
    assert int(one(nginx_server, "proxy_next_upstream_tries")[1][0]) == 3


def test_nginx_upstream_keepalive(nginx, nginx_server):
    http = one(nginx, "http")[2]
    upstream = one(http, "upstream", "pinfer_api")[2]
    assert find(upstream, "least_conn")
    servers = find(upstream, "server")
    assert len(servers) == 1 and servers[0][1][0] == "api:8000"
    assert any(a.startswith("max_fails=") for a in servers[0][1])
    assert int(one(upstream, "keepalive")[1][0]) >= 1
    assert one(nginx_server, "proxy_http_version")[1] == ["1.1"]
    assert ["Connection", ""] in [d[1] for d in find(nginx_server, "proxy_set_header")]
    headers = {d[1][0] for d in find(nginx_server, "proxy_set_header")}
    assert {"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-ID"} <= headers
    assert one(nginx_server, "listen")[1] == ["80"]


def test_nginx_compresses_json(nginx):
    http = one(nginx, "http")[2]
    assert one(http, "gzip")[1] == ["on"]
    assert {"application/json", "application/x-ndjson"} <= set(one(http, "gzip_types")[1])


def test_nginx_upstream_idles_out_before_gunicorn(nginx, monkeypatch):
    upstream = one(one(nginx, "http")[2], "upstream", "pinfer_api")[2]
    idle = nginx_seconds(one(upstream, "keepalive_timeout")[1][0])
    assert _load_gunicorn_conf(monkeypatch)["keepalive"] > idle


def test_rendered_loopback_conf(tmp_path):
    conf = render_nginx_conf(["127.0.0.1:18001", "127.0.0.1:18002"], "127.0.0.1:18080", tmp_path)
    text = conf.read_text()
    assert "api:8000" not in "\n".join(line.split("#")[0] for line in text.splitlines())
    tree = parse_nginx(text)
    upstream = one(one(tree, "http")[2], "upstream", "pinfer_api")[2]
    servers = find(upstream, "server")
    assert [s[1][0] for s in servers] == ["127.0.0.1:18001", "127.0.0.1:18002"]
    assert all(any(a.startswith("max_fails=") for a in s[1]) for s in servers)
    assert one(one(one(tree, "http")[2], "server")[2], "listen")[1] == ["127.0.0.1:18080"]
    assert one(tree, "pid")[1][0].startswith(str(tmp_path))
    for directive in ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path",
                      "uwsgi_temp_path", "scgi_temp_path"):
        assert one(one(tree, "http")[2], directive)[1][0].startswith(str(tmp_path))
    logs = [d[1][0] for d in find(tree, "error_log") + find(one(tree, "http")[2], "access_log")]
    assert logs and all(p.startswith(str(tmp_path)) for p in logs)
    # Loopback upstreams are IP addresses: no run-time resolution (nor Docker's DNS) there.
    assert not find(one(tree, "http")[2], "resolver")
    assert all("resolve" not in s[1] for s in servers)


def test_nginx_accepts_rendered_conf(tmp_path):
    if nginx_binary() is None:
        if IN_CI:
            pytest.fail("CI=true but nginx is not installed")
        pytest.skip("nginx not installed (apt-get install nginx)")
    conf = render_nginx_conf(["127.0.0.1:18001", "127.0.0.1:18002"], "127.0.0.1:18080", tmp_path)
    result = nginx_test(conf)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------- gunicorn
def _load_gunicorn_conf(monkeypatch, **env: str) -> dict:
    for var in list(os.environ):
        if var.startswith("PINFER_") or var in ("FORWARDED_ALLOW_IPS", "GUNICORN_CONTROL_SOCKET"):
            monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return runpy.run_path(str(GUNICORN_CONF))


def test_gunicorn_conf_defaults(monkeypatch):
    conf = _load_gunicorn_conf(monkeypatch)
    assert conf["worker_class"] == "gthread"
    assert conf["threads"] == DEFAULTS.api_threads
    assert conf["threads"] > DEFAULTS.max_waiters, "long-polls could occupy every thread"
    assert conf["workers"] == DEFAULTS.api_processes
    assert conf["bind"] == [f"0.0.0.0:{DEFAULTS.port}"]
    assert conf["timeout"] > DEFAULTS.max_wait_s
    assert conf["graceful_timeout"] >= DEFAULTS.max_wait_s
    assert conf["max_requests"] > 0 and conf["max_requests_jitter"] > 0
    assert conf["accesslog"] == "-"
    assert conf["preload_app"] is False


def test_gunicorn_conf_follows_settings(monkeypatch):
    conf = _load_gunicorn_conf(monkeypatch, PINFER_PORT="9123", PINFER_API_THREADS="80",
                               PINFER_API_PROCESSES="3", FORWARDED_ALLOW_IPS="*")
    assert conf["bind"] == ["0.0.0.0:9123"]
    assert (conf["threads"], conf["workers"]) == (80, 3)
    assert conf["forwarded_allow_ips"] == "*"


def test_gunicorn_conf_warns_when_threads_do_not_exceed_waiters(monkeypatch, capsys):
    _load_gunicorn_conf(monkeypatch, PINFER_API_THREADS="8", PINFER_MAX_WAITERS="8")
    assert "PINFER_MAX_WAITERS" in capsys.readouterr().err


def test_gunicorn_settings_names_exist():
    gunicorn_config = pytest.importorskip("gunicorn.config")
    known = {s.name for s in gunicorn_config.KNOWN_SETTINGS}
    conf = runpy.run_path(str(GUNICORN_CONF))
    ours = {k for k in conf if not k.startswith("_") and k not in ("annotations", "os", "sys", "Settings")}
    newer = {"control_socket", "control_socket_disable"}  # gunicorn >= 25.1, ignored by older
    unknown = ours - known - newer
    assert not unknown, f"not gunicorn settings (typos?): {unknown}"


# --------------------------------------------------------------------------------------- image
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def test_dockerfile_installs_cpu_torch_only():
    instr = _dockerfile_instructions()
    args = [a for i, a in instr if i == "ARG"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    runs = [a for i, a in instr if i == "RUN"]
    torch_installs = [r for r in runs if "req-torch" in r and "pip install" in r]
    assert torch_installs and all('--index-url "${TORCH_INDEX_URL}"' in r for r in torch_installs)
    # The rest never resolves torch from PyPI: the package goes in with --no-deps, and no RUN
    # names a bare `torch` requirement.
    assert any("pip install --no-deps --no-build-isolation ." in r for r in runs)
    # torch alone comes from its index, without dependencies: those come from the hashed lock.
    assert all("--no-deps" in r for r in torch_installs)
    assert any("pip install --require-hashes -r requirements/worker.txt" in r for r in runs)
    for run in runs:
        for command in re.split(r"&&|;|\|\|", run):
            words = command.split()
            if words[:2] == ["pip", "install"] and "--index-url" not in words:
                bare = [w for w in words if re.match(r"""["']?torch($|[=<>~!\["'])""", w)]
                assert not bare, f"torch installed without the CPU index: {command.strip()}"
    assert any("torch.version.cuda" in r for r in runs), "no guard against a CUDA torch"


def test_dockerfile_is_multistage_slim_non_root():
    instr = _dockerfile_instructions()
    froms = [a for i, a in instr if i == "FROM"]
    assert len(froms) >= 2
    # Pinned to a Debian release, with taskset's package installed explicitly in the final stage.
    assert "PYTHON_IMAGE=python:3.11-slim-bookworm" in [a for i, a in instr if i == "ARG"]
    final = max(idx for idx, (i, _) in enumerate(instr) if i == "FROM")
    final_stage = instr[final:]
    users = [a for i, a in final_stage if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "final stage must run as a non-root user"
    assert any(i == "COPY" and a.startswith("--from=builder /opt/venv") for i, a in final_stage)
    final_runs = " ".join(a for i, a in final_stage if i == "RUN")
    assert not re.search(r"\b(gcc|build-essential|pip install)\b", final_runs)
    assert re.search(r"apt-get install[^&]*\butil-linux\b", final_runs) and "command -v taskset" in final_runs
    assert "rm -rf /var/lib/apt/lists" in final_runs
    assert any(i == "HEALTHCHECK" for i, _ in final_stage)
    assert any(i == "ENV" and "PIP_NO_CACHE_DIR=1" in a for i, a in instr)


def test_dockerignore_keeps_context_small():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", "weights/build", ".git", "tests"} <= patterns
    assert "README.md" not in patterns and "pyproject.toml" not in patterns  # the build needs them


# --------------------------------------------------------------------------------------- entry point
@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_entrypoint_roles(tmp_path):
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "entry point must be executable"
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("pinfer", "gunicorn"):
        (fake / tool).write_text('#!/bin/sh\necho "$(basename "$0") $*"\n')
        (fake / tool).chmod(0o755)

    def run(*args: str, **env: str) -> str:
        full = {"PATH": f"{fake}:/usr/bin:/bin", "ENTRYPOINT_ROLE_FILE": str(tmp_path / "role"), **env}
        return subprocess.run(["sh", str(ENTRYPOINT), *args], env=full, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert run() == "pinfer api"
    assert run("worker") == "pinfer worker"
    assert (tmp_path / "role").read_text().strip() == "worker"
    assert run("healthcheck") == "pinfer worker --check"
    assert run("model", PINFER_MODEL_DIR="/models") == \
        "pinfer export-model --out /models --if-missing --fallback-random-init"
    weights = tmp_path / "r18.pth"
    weights.write_bytes(b"weights")
    assert run("model", PINFER_MODEL_DIR="/m", EXPORT_WEIGHTS=str(weights),
               EXPORT_FALLBACK_RANDOM_INIT="0", EXPORT_FORCE="1") == \
        f"pinfer export-model --out /m --weights {weights}"
    # Weights named but not mounted: a message that says how to mount them, not a traceback.
    missing = subprocess.run(["sh", str(ENTRYPOINT), "model"], capture_output=True, text=True,
                             env={"PATH": f"{fake}:/usr/bin:/bin", "ENTRYPOINT_ROLE_FILE": str(tmp_path / "role"),
                                  "EXPORT_WEIGHTS": "/weights/nowhere.pth"})
    assert missing.returncode == 2 and missing.stdout == ""
    assert "/weights/nowhere.pth" in missing.stderr and "-v" in missing.stderr
    assert run("model", PINFER_MODEL_DIR="/m", EXPORT_PRECISION="fp32,int8", EXPORT_RUNTIME="torchscript,onnx",
               EXPORT_CALIBRATION="/calibration") == \
        "pinfer export-model --out /m --if-missing --fallback-random-init --precision fp32,int8 " \
        "--runtime torchscript,onnx --calibration /calibration"
    assert run("echo", "hi") == "hi"


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_entrypoint_refuses_to_start_the_api_without_usable_keys(tmp_path):
    """With PINFER_API_KEYS_FILE set, the api role starts only on a file that holds a key; otherwise
    it exits 2 with one line saying what is wrong, and never runs the API open."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pinfer").write_text('#!/bin/sh\necho "pinfer $*"\n')
    (fake / "pinfer").chmod(0o755)

    def run(keys: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(ENTRYPOINT), "api"], capture_output=True, text=True,
                              env={"PATH": f"{fake}:/usr/bin:/bin", "ENTRYPOINT_ROLE_FILE": str(tmp_path / "role"),
                                   "PINFER_API_KEYS_FILE": str(keys)})

    keys = tmp_path / "api-keys"
    for setup, reason in ((lambda: None, "does not exist"),
                          (keys.mkdir, "is a directory"),
                          (lambda: (keys.rmdir(), keys.write_text("# no keys yet\n")), "holds no key"),
                          (lambda: keys.write_text("alice not-a-hash\n"), "holds no key")):
        setup()
        out = run(keys)
        assert out.returncode == 2 and out.stdout == "", reason
        assert f"PINFER_API_KEYS_FILE={keys} {reason}" in out.stderr and "pinfer api-key" in out.stderr
    keys.write_text("# comment\nalice " + "ab" * 32 + "  # laptop\n")
    assert run(keys).stdout.strip() == "pinfer api"
    if os.geteuid() != 0:                               # root reads any file
        keys.chmod(0)
        out = run(keys)
        assert out.returncode == 2 and "is not readable" in out.stderr


# --------------------------------------------------------------------------------------- make install
def test_make_install_takes_torch_from_the_cpu_index(tmp_path):
    """`make install` (the README's first command, via `make up`) must not resolve `torch` from
    PyPI, whose Linux wheel is the CUDA build with ~3 GB of nvidia-* packages."""
    make = shutil.which("make")
    if make is None:
        if IN_CI:
            pytest.fail("CI=true but make is not installed")
        pytest.skip("make not installed")

    def dry_run(*overrides: str) -> list[str]:
        out = subprocess.run([make, "-n", "-C", str(ROOT), "install", f"VENV={tmp_path / 'venv'}", *overrides],
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "pip install" in line]

    pin = next(r for r in tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["worker"]
               if re.match(r"torch\b", r))
    assert pin.startswith("torch==")
    steps = dry_run()
    torch_steps = [i for i, line in enumerate(steps) if "torch==" in line]
    lock = [i for i, line in enumerate(steps) if "--require-hashes -r requirements/dev.txt" in line]
    package = [i for i, line in enumerate(steps) if line.rstrip().endswith("-e .")]
    assert len(torch_steps) == 1 and len(lock) == 1 and len(package) == 1, steps
    torch_step = steps[torch_steps[0]]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_step
    assert "--no-deps" in torch_step, "only torch itself comes from the torch index"
    assert f"'{pin}'" in torch_step, "the same pin as pyproject.toml"
    # Everything else from the hash-checked lock, then the package without resolving anything (a
    # resolver run could fetch PyPI's CUDA torch).
    assert "--no-deps" in steps[package[0]]
    assert torch_steps[0] < package[0] and lock[0] < package[0], steps
    assert "--index-url" not in steps[lock[0]] and "--index-url" not in steps[package[0]]
    # Overridable: a mirror of the CPU index, or other pip arguments altogether.
    mirror = dry_run("TORCH_INDEX_URL=https://mirror.example/whl/cpu")
    assert "--index-url https://mirror.example/whl/cpu" in next(s for s in mirror if "torch==" in s)
    custom = dry_run("TORCH_PIP_ARGS=--no-deps --find-links /srv/wheels")
    assert "--find-links /srv/wheels" in next(s for s in custom if "torch==" in s)


def test_license_is_an_spdx_expression():
    """The `{text = ...}` table form stops building with setuptools releases from 2027 on."""
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    setuptools = next(r for r in data["build-system"]["requires"] if r.startswith("setuptools"))
    m = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools.replace(" ", ""))
    assert m and int(m[1]) >= 77, "SPDX `license` strings need setuptools >= 77"


def test_gunicorn_caps_malloc_arenas_unless_told_otherwise(monkeypatch):
    """PINFER_API_MALLOC_ARENAS reaches glibc; 0 or an explicit MALLOC_ARENA_MAX leaves glibc alone."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt(M_ARENA_MAX) is glibc's")
    conf = runpy.run_path(str(GUNICORN_CONF))
    cap = conf["_cap_malloc_arenas"]
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert cap(2) is True
    assert cap(0) is False
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cap(2) is False
