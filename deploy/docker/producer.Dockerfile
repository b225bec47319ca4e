# The producer image: numpy, redis-py, msgpack, pydantic-settings and no torch: about 120 MB
# over the base image, against about 1 GB for the CPU trainer. The autoscaler service runs the
# same image (`python -m services.autoscaler`), so it also has the docker SDK (the `autoscaler`
# extra: docker, requests, urllib3; a few MB). Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 >= 3.10 and its venv module
#               (python:3.11-slim by default; a local image for air-gapped builds)
#   WHEEL_DIR   a directory inside the build context whose wheels pip prefers to any index
#               (deploy/docker/wheels by default; see its README)
ARG BASE_IMAGE=python:3.11-slim
ARG WHEEL_DIR=deploy/docker/wheels

FROM scratch AS wheels
ARG WHEEL_DIR
COPY ${WHEEL_DIR}/ /

FROM ${BASE_IMAGE}
LABEL maskstream.image=producer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# A virtual environment works the same on python:*-slim and on a Debian python3
# (whose system site-packages pip may not touch).
RUN python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group maskstream \
    && install -d -o maskstream -g maskstream /cache

WORKDIR /app
# Dependencies first, each pinned with the sha256 of its wheel (pip refuses any other file:
# deploy/docker/pin-requirements.py writes the list), then the project itself without deps.
# The wheels are bind-mounted for this step only: they never land in a layer.
COPY deploy/docker/requirements/producer.txt /tmp/requirements.txt
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --find-links /wheels --require-hashes --no-deps -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-deps . && pip check

USER maskstream
ENV CACHE_DIR=/cache
EXPOSE 9100
ENTRYPOINT ["python", "-m", "services.producer"]
