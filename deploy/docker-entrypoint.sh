#!/bin/sh
# pinfer container entry point: one image, the role is the first argument (CMD).
#
#   api          pinfer api: gunicorn with pinfer/gunicorn_conf.py, 'api:create_app()'   (default);
#                refuses to start when PINFER_API_KEYS_FILE is set but unusable (missing, a directory,
#                unreadable, no key in it)
#   worker       pinfer worker      (PINFER_WORKERS / PINFER_CORE_LEASE decide how many / which core)
#   model        pinfer export-model --out "$PINFER_MODEL_DIR" --if-missing  (one-shot, see below)
#   healthcheck  the image's HEALTHCHECK: checks whatever role this container runs
#   anything else is executed as is (e.g. `pinfer settings`, `sh`).
#
# `model` options (environment, not PINFER_* settings: only this script reads them):
#   EXPORT_WEIGHTS=/path/to/resnet18.pth   export these weights instead of downloading: a path INSIDE
#                                          the container, mounted by the same `docker compose run -v`
#   EXPORT_FALLBACK_RANDOM_INIT=1          (default 1) no internet and no weights: export a randomly
#                                          initialised model (it works, /readyz shows pretrained=false)
#                                          instead of failing; 0 = fail.
#   EXPORT_FORCE=1                         replace an existing artifact (drops --if-missing)
#   EXPORT_PRECISION=fp32,int8             variants to build (--precision; default fp32)
#   EXPORT_RUNTIME=torchscript,onnx        runtimes to build them for (--runtime; default torchscript)
#   EXPORT_CALIBRATION=/calibration        folder of photos (mount it) for int8 and the fidelity gate
set -eu

ROLE_FILE="${ENTRYPOINT_ROLE_FILE:-/tmp/pinfer-role}"

role="${1:-api}"
[ "$#" -gt 0 ] && shift

api_keys_problem() {
    # Why the API keys file named by PINFER_API_KEYS_FILE cannot be used (nothing when it can). The API
    # itself also refuses a missing or malformed file; this says why in one line, before gunicorn starts.
    f="$1"
    if [ -d "$f" ]; then
        echo "is a directory: the file was missing on the host when the container was created, and Docker made a directory in its place"
    elif [ ! -e "$f" ]; then
        echo "does not exist"
    elif [ ! -r "$f" ]; then
        echo "is not readable by uid $(id -u): make it readable (chmod 0644; it holds only sha256 hashes, never a key)"
    elif ! grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+[0-9a-fA-F]{64}[[:space:]]*(#.*)?$' "$f"; then
        echo "holds no key"
    fi
}

remember_role() {
    # Read by `healthcheck` (a separate process started by Docker). Best effort: /tmp may be read-only.
    { echo "$1" > "$ROLE_FILE"; } 2>/dev/null || true
}

case "$role" in
    api)
        remember_role api
        if [ -n "${PINFER_API_KEYS_FILE:-}" ]; then
            problem="$(api_keys_problem "$PINFER_API_KEYS_FILE")"
            if [ -n "$problem" ]; then
                echo "PINFER_API_KEYS_FILE=$PINFER_API_KEYS_FILE $problem. Refusing to start the API" \
                     "(it never runs without its keys). Create the file with \`pinfer api-key NAME --file PATH\`" \
                     "and mount it (compose: deploy/api-keys or API_KEYS_FILE in .env; see deploy/README.md)." >&2
                exit 2
            fi
        fi
        exec pinfer api "$@"
        ;;
    worker)
        remember_role worker
        exec pinfer worker "$@"
        ;;
    model)
        remember_role model
        set -- --out "${PINFER_MODEL_DIR:-/models}" "$@"
        [ "${EXPORT_FORCE:-0}" = "1" ] || set -- "$@" --if-missing
        if [ -n "${EXPORT_WEIGHTS:-}" ]; then
            if [ ! -f "$EXPORT_WEIGHTS" ]; then
                echo "EXPORT_WEIGHTS=$EXPORT_WEIGHTS: no such file in this container; mount it, e.g." \
                     "docker compose run --rm -e EXPORT_WEIGHTS=/weights/w.pth -v \"\$PWD/w.pth:/weights/w.pth:ro\" model" >&2
                exit 2
            fi
            set -- "$@" --weights "$EXPORT_WEIGHTS"
        fi
        [ "${EXPORT_FALLBACK_RANDOM_INIT:-1}" = "1" ] && set -- "$@" --fallback-random-init
        [ -n "${EXPORT_PRECISION:-}" ] && set -- "$@" --precision "$EXPORT_PRECISION"
        [ -n "${EXPORT_RUNTIME:-}" ] && set -- "$@" --runtime "$EXPORT_RUNTIME"
        [ -n "${EXPORT_CALIBRATION:-}" ] && set -- "$@" --calibration "$EXPORT_CALIBRATION"
        exec pinfer export-model "$@"
        ;;
    healthcheck)
        current="$(cat "$ROLE_FILE" 2>/dev/null || echo "${ENTRYPOINT_ROLE:-api}")"
        case "$current" in
            api)
                exec python -c "
import os, sys, urllib.request
url = 'http://127.0.0.1:%s/healthz' % (os.environ.get('PINFER_PORT') or '8000')
try:
    urllib.request.urlopen(url, timeout=4)
except Exception as exc:
    sys.exit(f'{url}: {exc}')
"
                ;;
            worker)
                exec pinfer worker --check
                ;;
            *)
                exit 0
                ;;
        esac
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
