# Redis, the Redis exporter and Prometheus from Debian's packages, in one image on the
# local Debian base: the air-gapped stand-ins for the redis, oliver006/redis_exporter and
# prom/prometheus images (deploy/compose/airgap.yml). One image, three commands, so an
# air-gapped build runs apt-get once.
ARG BASE_IMAGE=localhost/maskstream-debian:bookworm
FROM ${BASE_IMAGE}
LABEL maskstream.image=debian-services
# No service starts inside a build; policy-rc.d says so to every postinst script.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        redis-server prometheus prometheus-redis-exporter \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && install -d -o nobody -g nogroup /prometheus \
    && redis-server --version && prometheus --version 2>&1 | head -1 \
    && prometheus-redis-exporter --version 2>&1 | head -1
USER nobody
