#!/bin/sh
# The container's entrypoint.
#   (no arguments) / serve        relay serve with $RELAY_CONFIG (default /etc/relay/config.toml)
#   queue list, check-config, ... any relay command, with the same config
#   healthcheck                   exit 0 when $RELAY_HEALTH_URL (/readyz) answers 200
#   sh, python, ...               any other program on the PATH, run as is
# `exec` throughout: relay becomes PID 1 and receives docker stop's SIGTERM itself.
set -eu
: "${RELAY_CONFIG:=/etc/relay/config.toml}"
export RELAY_CONFIG

if [ "$#" -eq 0 ]; then
    set -- serve
fi

if [ "$1" = healthcheck ]; then
    exec python -c '
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=4) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except urllib.error.HTTPError as exc:
    body = exc.read(500).decode(errors="replace")
    print("not ready:", exc.code, body, file=sys.stderr)
except OSError as exc:
    print("not ready:", sys.argv[1], exc, file=sys.stderr)
sys.exit(1)
' "${RELAY_HEALTH_URL:-http://127.0.0.1:8025/readyz}"
fi

if [ "$1" != relay ] && command -v -- "$1" >/dev/null 2>&1; then
    exec "$@"
fi
if [ "$1" = relay ]; then
    shift
fi

config_named=no
for argument in "$@"; do
    case "$argument" in
        -h | --help | --version | --config | --config=*) config_named=yes ;;
    esac
done
case "$config_named" in
    yes) ;;
    *)
        if [ ! -r "$RELAY_CONFIG" ]; then
            echo "relay: cannot read the config file $RELAY_CONFIG." >&2
            echo "Mount yours there (-v /srv/relay/config.toml:$RELAY_CONFIG:ro)" \
                "or set RELAY_CONFIG to where it is mounted." >&2
            exit 78
        fi
        ;;
esac
exec relay "$@"
