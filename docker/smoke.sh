#!/usr/bin/env bash
# End-to-end check of the image for a machine with Docker (engine and the compose plugin)
# and swaks: build, start the relay with compose.yaml, wait until its HEALTHCHECK (/readyz)
# passes, send one mail, find it in the Maildir outbox inside the container, stop the
# relay and check it exited cleanly, then remove the containers and volumes.
#   docker/smoke.sh          (RELAY_SMTP_PORT / RELAY_WEB_PORT: host ports, 2525 / 8025)
set -euo pipefail
cd "$(dirname "$0")"

for tool in docker swaks curl; do
    if ! command -v "$tool" >/dev/null; then
        echo "smoke: $tool is needed (apt-get install swaks; Docker from docs.docker.com)" >&2
        exit 1
    fi
done

export COMPOSE_PROJECT_NAME=relay-smoke
RELAY_TOKEN_OPS="smoke-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export RELAY_TOKEN_OPS
smtp_port=${RELAY_SMTP_PORT:-2525}
web_port=${RELAY_WEB_PORT:-8025}
compose() { docker compose -f compose.yaml "$@"; }
cleanup() { compose down --volumes --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "smoke: building the image"
compose build relay
echo "smoke: starting the relay (waits for the healthcheck)"
compose up --detach --wait --wait-timeout 120 relay
compose exec -T relay relay check-config

subject="relay smoke test $(date +%s)-$$"
echo "smoke: sending '$subject' to 127.0.0.1:$smtp_port"
swaks --server "127.0.0.1:$smtp_port" --ehlo smoke.test \
    --from smoke@example.com --to someone@example.org \
    --header "Subject: $subject" --body "Sent by docker/smoke.sh." \
    --quit-after . --hide-all

# 250 meant "on disk"; the outbox upstream delivers it a moment later.
found=""
for _ in $(seq 1 60); do
    for file in $(compose exec -T relay ls /var/lib/relay/outbox/new 2>/dev/null); do
        if compose exec -T relay grep -q -F "Subject: $subject" "/var/lib/relay/outbox/new/$file"; then
            found=$file
        fi
    done
    [ -n "$found" ] && break
    sleep 1
done
if [ -z "$found" ]; then
    echo "smoke: FAILED: the message is not in /var/lib/relay/outbox/new; the relay's log:" >&2
    compose logs relay >&2
    exit 1
fi
echo "smoke: delivered to the outbox as $found"

curl -fsS -H "Authorization: Bearer $RELAY_TOKEN_OPS" \
    "http://127.0.0.1:$web_port/api/v1/messages" >/dev/null \
    && echo "smoke: the API answers with the admin token"

container=$(compose ps --all --quiet relay)
compose stop relay
status=$(docker inspect --format '{{.State.ExitCode}}' "$container")
if [ "$status" != 0 ]; then
    echo "smoke: FAILED: the relay exited with status $status on docker stop" >&2
    compose logs relay >&2
    exit 1
fi
echo "smoke: passed"
