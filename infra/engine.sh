#!/usr/bin/env bash
# A private container engine for tests and CI: Debian's docker.io, dockerd run as root with all of
# its state in one folder and the host network left untouched (no bridge, no iptables rules, no
# ip forwarding), so containers run with host networking. No registry is needed.
#
#   infra/engine.sh start   install docker.io if dockerd is missing, start dockerd, wait until it answers
#   infra/engine.sh stop    stop dockerd, unmount what it leaves, remove the folder
#   infra/engine.sh env     print the `export DOCKER_HOST=...` line (eval "$(infra/engine.sh env)")
#
# SPECSTREAM_ENGINE_DIR sets the folder (default /tmp/specstream-engine; a unix socket path must stay
# under 108 bytes). SPECSTREAM_ENGINE_WAIT_S bounds the wait for the engine (default 60 s).
set -euo pipefail

DIR="${SPECSTREAM_ENGINE_DIR:-/tmp/specstream-engine}"
SOCK="$DIR/docker.sock"
PIDFILE="$DIR/docker.pid"
WAIT_S="${SPECSTREAM_ENGINE_WAIT_S:-60}"

say() { echo "engine: $*" >&2; }
answers() { DOCKER_HOST="unix://$SOCK" timeout 5 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_engine() {
    command -v dockerd >/dev/null && return 0
    [ "$(id -u)" = 0 ] || { say "error: dockerd is missing; install docker.io as root"; exit 1; }
    say "installing Debian's docker.io (dockerd is missing)"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -q --no-install-recommends docker.io >/dev/null; then
        timeout 300 apt-get update -q >/dev/null
        timeout 600 apt-get install -y -q --no-install-recommends docker.io >/dev/null
    fi
}

start() {
    install_engine
    if answers; then
        say "already running at $SOCK"
    else
        mkdir -p "$DIR/data" "$DIR/exec"
        # overlay2 is the driver to use: vfs copies each root filesystem per container.
        nohup dockerd \
            --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$PIDFILE" \
            -H "unix://$SOCK" --storage-driver overlay2 \
            --iptables=false --ip6tables=false --bridge=none --ip-forward=false --ip-masq=false \
            >"$DIR/dockerd.log" 2>&1 </dev/null &
        local deadline=$((SECONDS + WAIT_S))
        until answers; do
            if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$!" 2>/dev/null; then
                say "error: dockerd did not answer within ${WAIT_S}s; its log ($DIR/dockerd.log) ends:"
                tail -n 20 "$DIR/dockerd.log" >&2 || true
                exit 1
            fi
            sleep 0.2
        done
    fi
    echo "engine: docker $(DOCKER_HOST="unix://$SOCK" docker version --format \
        '{{.Server.Version}} (API {{.Server.APIVersion}}, {{.Server.Os}}/{{.Server.Arch}})') at unix://$SOCK"
}

stop() {
    if [ -f "$PIDFILE" ]; then
        local pid
        pid="$(cat "$PIDFILE")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            local deadline=$((SECONDS + 30))
            while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && { say "dockerd did not stop in 30 s: killing it"; kill -KILL "$pid"; }
        fi
    fi
    # dockerd leaves a bind mount at <exec-root>/netns/default (and a crash may leave overlay mounts):
    # unmount everything under the folder, deepest first, before removing it.
    if [ -d "$DIR" ]; then
        local mounts
        mounts="$(awk -v d="$DIR/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r)"
        for m in $mounts; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
        rm -rf "$DIR"
    fi
    say "stopped; $DIR removed"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export DOCKER_HOST=unix://$SOCK" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
