# The producer image: numpy, redis-py, msgpack, pydantic-settings; no torch.
# BASE_IMAGE picks the base (a local one for air-gapped builds).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 maskstream
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir .

USER maskstream
ENTRYPOINT ["python", "-m", "services.producer"]
