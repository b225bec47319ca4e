#!/usr/bin/env bash
# Run compose on whatever this machine has: `docker compose` (or docker-compose) where a
# Docker engine answers, else podman-compose with podman. A docker CLI without an engine
# behind it (a client only, or a socket nobody serves) does not count.
#
#   deploy/docker/compose.sh [compose arguments...]      e.g. up -d, ps, logs -f producer
#   deploy/docker/compose.sh --which                     print the command it would use
#
# COMPOSE_FILES (default docker-compose.yml) names the files, separated by ':'. Under
# podman, PODMAN_BUILD_ARGS (e.g. --network=host) go to every image build.
set -euo pipefail
cd "$(dirname "$0")/../.."

pick() {
    if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
        if docker compose version >/dev/null 2>&1; then
            echo "docker compose"; return
        elif command -v docker-compose >/dev/null; then
            echo "docker-compose"; return
        fi
        echo "compose.sh: a Docker engine answers but has no compose: install the" \
            "docker-compose-plugin package (or docker-compose)" >&2
        return 1
    fi
    if command -v podman >/dev/null && timeout 30 podman info >/dev/null 2>&1; then
        local pc
        for pc in podman-compose .venv/bin/podman-compose; do
            if command -v "$pc" >/dev/null; then echo "$pc"; return; fi
        done
        echo "compose.sh: podman is here but podman-compose is not: pip install podman-compose" \
            "(or apt-get install podman-compose)" >&2
        return 1
    fi
    cat >&2 <<'MSG'
compose.sh: no container engine answers here.
  Docker: install Docker Engine and its compose plugin (docker-ce, docker-compose-plugin;
          https://docs.docker.com/engine/install/) and start it; a docker CLI alone is not
          enough. For the GPU trainer add the NVIDIA container toolkit.
  Podman: apt-get install podman (plus runc on cgroup v1 hosts), then
          pip install podman-compose.
Without containers: `make demo` runs the whole pipeline locally.
MSG
    return 1
}

cmd=$(pick)
if [ "${1:-}" = "--which" ]; then
    echo "$cmd"
    exit 0
fi

files=()
IFS=: read -r -a names <<<"${COMPOSE_FILES:-docker-compose.yml}"
for f in "${names[@]}"; do files+=(-f "$f"); done

if [[ "$cmd" == *podman-compose ]]; then
    extra=()
    [ -n "${PODMAN_BUILD_ARGS:-}" ] && extra+=("--podman-build-args=$PODMAN_BUILD_ARGS")
    # Profiles as --profile too: podman-compose before 1.1 reads no COMPOSE_PROFILES.
    IFS=, read -r -a profiles <<<"${COMPOSE_PROFILES:-$(sed -n 's/^COMPOSE_PROFILES=//p' .env 2>/dev/null)}"
    for p in "${profiles[@]}"; do [ -n "$p" ] && extra+=(--profile "$p"); done
    project=${COMPOSE_PROJECT_NAME:-maskstream}
    if [ "${1:-}" = logs ]; then
        # podman-compose's logs also knows only the file's replica count: ask podman for
        # the project's containers (of the named services) instead.
        shift
        flags=() names=()
        for arg in "$@"; do
            if [[ "$arg" == -* ]]; then flags+=("$arg"); else names+=("$arg"); fi
        done
        filters=(--filter "label=io.podman.compose.project=$project")
        containers=()
        if ((${#names[@]})); then
            for service in "${names[@]}"; do
                mapfile -t -O "${#containers[@]}" containers < <(podman ps -a \
                    --format '{{.Names}}' "${filters[@]}" \
                    --filter "label=io.podman.compose.service=$service")
            done
        else
            mapfile -t containers < <(podman ps -a --format '{{.Names}}' "${filters[@]}")
        fi
        ((${#containers[@]})) || { echo "compose.sh: no containers of $project" >&2; exit 1; }
        exec podman logs --names "${flags[@]}" "${containers[@]}"
    fi
    if [ "${1:-}" != down ]; then
        exec $cmd "${files[@]}" "${extra[@]}" "$@"
    fi
    # podman-compose's down knows only the file's replica count: replicas added with
    # --scale would survive it, and stopped after Redis they would wait for it in vain.
    # So stop every producer and trainer first (trainers get time for a checkpoint),
    # then the rest, then whatever is left.
    for service in producer trainer trainer-cpu; do
        ids=$(podman ps -q --filter "label=io.podman.compose.project=$project" \
            --filter "label=io.podman.compose.service=$service")
        [ -z "$ids" ] || podman stop -t 60 $ids >/dev/null
    done
    $cmd "${files[@]}" "${extra[@]}" "$@"
    left=$(podman ps -aq --filter "label=io.podman.compose.project=$project")
    if [ -n "$left" ]; then
        podman stop -t 30 $left >/dev/null
        podman rm -f $left >/dev/null
        exec $cmd "${files[@]}" "${extra[@]}" "$@"
    fi
    exit 0
fi
exec $cmd "${files[@]}" "$@"
