#!/usr/bin/env bash
# Pin the stack's upstream images by digest: pulls each (a registry must be reachable) and
# prints the .env lines that name it by digest, which compose then uses instead of the tag:
#
#   deploy/docker/pin-images.sh >>.env        # review, then commit your .env.example copy
#
# ENGINE=podman uses podman. Tags, not digests, are committed here: no registry is reachable
# where this project's CI runs, so a digest could be neither looked up nor tested. A digest
# names one exact image, so the pin also stops a re-pushed tag from changing what runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
engine=${ENGINE:-docker}
# VARIABLE=default tag, as docker-compose.yml reads them.
images=(
    BASE_IMAGE=python:3.11-slim
    REDIS_IMAGE=redis:7.4
    REDIS_EXPORTER_IMAGE=oliver006/redis_exporter:v1.67.0
    PROMETHEUS_IMAGE=prom/prometheus:v2.55.1
    GRAFANA_IMAGE=grafana/grafana:11.6.0
    ENGINE_PROXY_IMAGE=haproxy:2.8
)
for pair in "${images[@]}"; do
    variable=${pair%%=*}
    tag=${!variable:-${pair#*=}}
    tag=${tag%@*}
    "$engine" pull --quiet "$tag" >/dev/null
    digest=$("$engine" image inspect --format '{{index .RepoDigests 0}}' "$tag")
    echo "$variable=${tag}@${digest#*@}"
done
