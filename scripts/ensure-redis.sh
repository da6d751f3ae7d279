#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:${KVZAP_REDIS_PORT:-6379}: uses the running one, else starts
# one (installing Debian's redis-server first when it is missing). Keeps nothing on disk.
set -euo pipefail
PORT=${KVZAP_REDIS_PORT:-6379}
ping() { redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; }
if command -v redis-cli >/dev/null && ping; then
  echo "[redis] up on 127.0.0.1:$PORT"; exit 0
fi
if ! command -v redis-server >/dev/null; then
  echo "[redis] installing redis-server from Debian's packages"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "[redis] starting redis-server on 127.0.0.1:$PORT"
redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no \
  --dir /tmp --logfile /tmp/kvzap-redis-$PORT.log
for _ in $(seq 1 50); do ping && { echo "[redis] up"; exit 0; }; sleep 0.1; done
echo "[redis] failed to start; see /tmp/kvzap-redis-$PORT.log" >&2; exit 1
