# The trainer image: the project plus torch, run as torchrun with one process per GPU.
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3 >= 3.10 and its venv module
#                    (python:3.11-slim by default; a local image for air-gapped builds). No CUDA
#                    base image is needed: torch's Linux wheels on PyPI carry the CUDA runtime
#                    (nvidia-* wheels) and the driver comes from the host through the NVIDIA
#                    container toolkit.
#   TORCH_SPEC       the torch requirement: torch==2.13.0 (PyPI's CUDA 13 build, which needs an
#                    NVIDIA driver >= 580) by default; for an older driver pick a CUDA 12 build,
#                    e.g. TORCH_SPEC=torch==2.13.0+cu126 with
#                    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126.
#                    The CPU image uses torch==2.13.0+cpu.
#   TORCH_VARIANT    cuda (default) or cpu: the build the image is for. A cuda image whose
#                    torch turns out a CPU build (a +cpu wheel in WHEEL_DIR satisfies
#                    torch==2.13.0) fails to build, naming the cause.
#   TORCH_INDEX_URL  the index torch and its own dependencies come from, instead of PyPI
#                    (--index-url, never an extra index: one index per step, so no package
#                    name can be shadowed from another), e.g. https://download.pytorch.org/whl/cpu
#                    or .../cu126; empty = PyPI and the wheel directory only
#   WHEEL_DIR        a directory inside the build context whose wheels pip prefers to any index
#                    (deploy/docker/wheels by default; see its README)
ARG BASE_IMAGE=python:3.11-slim
ARG WHEEL_DIR=deploy/docker/wheels

FROM scratch AS wheels
ARG WHEEL_DIR
COPY ${WHEEL_DIR}/ /

FROM ${BASE_IMAGE}
LABEL maskstream.image=trainer
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG TORCH_VARIANT=cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group maskstream \
    && install -d -o maskstream -g maskstream /cache /runs

COPY deploy/docker/check-torch.py /usr/local/lib/check-torch.py
# torch first, in its own layer: code changes do not reinstall it. The wheels are
# bind-mounted for this step only, so a wheel never lands in a layer twice.
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --find-links /wheels \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
    && python -W ignore /usr/local/lib/check-torch.py "$TORCH_SPEC" "$TORCH_VARIANT"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY deploy/docker/trainer-entrypoint.sh /usr/local/bin/trainer-entrypoint
# Every other dependency pinned with the sha256 of its wheel (deploy/docker/pin-requirements.py),
# then the project itself without deps; pip check proves torch's and ours agree.
COPY deploy/docker/requirements/trainer.txt /tmp/requirements.txt
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --find-links /wheels --require-hashes --no-deps -r /tmp/requirements.txt \
    && pip install --no-deps . && pip check

USER maskstream
ENV CACHE_DIR=/cache OUT_DIR=/runs/default NPROC_PER_NODE=gpu
EXPOSE 9200
ENTRYPOINT ["trainer-entrypoint"]
