#!/usr/bin/env bash
# Write .env from .env.example (unless .env exists) and every missing secret in SECRETS_DIR
# (default .secrets/): a random password per Redis role (producer, trainer, exporter,
# autoscaler, admin), the exporter's JSON form of its own, and Grafana's admin password.
# Existing secret files are kept: delete one (or all) and rerun to rotate it
# (docs/operations.md, "Security"). Never commit .secrets/ (.gitignore keeps it out).
#
# Files are 0444 in a 0700 directory: only root (and the owner) reach them on the host, and
# each container's non-root user can read the one compose mounts into it.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/docker/dotenv.sh

if [ ! -f .env ]; then
    (umask 077 && cp .env.example .env)
    echo "make-env: wrote .env from .env.example (edit it to change settings)"
fi
secrets=$(setting SECRETS_DIR .secrets)  # where compose will look for them

random_password() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

write_secret() {  # name content
    [ -f "$secrets/$1" ] && return 0
    printf '%s' "$2" >"$secrets/$1.tmp"
    chmod 0444 "$secrets/$1.tmp"
    mv "$secrets/$1.tmp" "$secrets/$1"
    echo "make-env: wrote $secrets/$1"
}

mkdir -p "$secrets"
chmod 0700 "$secrets"
for role in producer trainer exporter autoscaler admin; do
    write_secret "redis-$role" "$(random_password)"
done
# redis_exporter's --redis.password-file: a JSON map of address -> password (its own role's).
# Rewritten whenever redis-exporter is newer, so a rotation carries over.
if [ "$secrets/redis-exporter" -nt "$secrets/redis-exporter.json" ]; then
    rm -f "$secrets/redis-exporter.json"
fi
write_secret redis-exporter.json "{\"redis://redis:6379\": \"$(cat "$secrets/redis-exporter")\"}"
write_secret grafana-admin "$(random_password)"
