#!/usr/bin/env bash
# `make scale N=4`: run N producer replicas. Compose adds or removes replicas; under
# podman-compose, which only adds, the surplus replicas are stopped here, highest number
# first, each with a grace period to finish its send (a producer stops on SIGTERM after
# the current one).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/docker/dotenv.sh
n=${1:?usage: scale.sh N}
[[ "$n" =~ ^[0-9]+$ ]] || { echo "scale.sh: N must be a number, not '$n'" >&2; exit 2; }

deploy/docker/compose.sh up -d --no-recreate --scale "producer=$n"

cmd=$(deploy/docker/compose.sh --which)
if [[ "$cmd" == *podman-compose ]]; then
    project=$(setting COMPOSE_PROJECT_NAME maskstream)
    podman ps -a --filter "label=io.podman.compose.project=$project" \
        --filter "label=io.podman.compose.service=producer" \
        --format '{{.Labels}} {{.Names}}' |
        sed -n 's/.*com\.docker\.compose\.container-number:\([0-9]*\).* \([^ ]*\)$/\1 \2/p' |
        sort -rn | while read -r number name; do
            if [ "$number" -gt "$n" ]; then
                echo "scale.sh: stopping $name"
                podman stop -t 30 "$name" >/dev/null && podman rm "$name" >/dev/null
            fi
        done
fi
