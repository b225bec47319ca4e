#!/usr/bin/env bash
# Write .env from .env.example with a random Redis password, unless .env exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -f .env ]; then
    exit 0
fi
password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
umask 077
sed "s/^REDIS_PASSWORD=.*/REDIS_PASSWORD=$password/" .env.example >.env
echo "make-env: wrote .env with a random REDIS_PASSWORD (edit it to change settings)"
