# Redis, the Redis exporter and Prometheus from Debian's packages, in one image on the
# local Debian base: the air-gapped stand-ins for the redis, oliver006/redis_exporter and
# prom/prometheus images (deploy/compose/airgap.yml). One image, three commands, built once
# (by the redis service) and run by all three. Writable data directories as the official
# images have them: /data for Redis's append-only file (owned by the package's redis user,
# which the redis service runs as; a new named volume takes that owner) and /prometheus.
ARG BASE_IMAGE=localhost/maskstream-debian:bookworm
FROM ${BASE_IMAGE}
LABEL maskstream.image=debian-services
# No service starts inside a build; policy-rc.d says so to every postinst script.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        redis-server prometheus prometheus-redis-exporter haproxy \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && install -d -o nobody -g nogroup /prometheus \
    && install -d -o redis -g redis -m 0750 /data \
    && redis-server --version && prometheus --version 2>&1 | head -1 \
    && prometheus-redis-exporter --version 2>&1 | head -1 && haproxy -v | head -1
USER nobody
