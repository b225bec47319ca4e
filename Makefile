# maskstream: run `make help` for the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch that .venv gets when it has none. pip takes the build its index offers for the pin
# (a CPU build from a CPU index or local wheel; PyPI's Linux wheel is a CUDA build). Given on
# the command line (`make install TORCH_SPEC=torch`), it replaces the torch of an existing .venv
# once; see docs/training.md, "On a GPU".
TORCH_SPEC ?= torch==2.13.0
TORCH_STAMP := $(VENV)/.torch-spec
TORCH_CHANGED := $(if $(filter command line,$(origin TORCH_SPEC)),$(shell [ "$$(cat $(TORCH_STAMP) 2>/dev/null)" = "$(TORCH_SPEC)" ] || echo FORCE))
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast test-chaos lint format bench bench-producer bench-trainer bench-autoscaler bench-quality bench-masking bench-gpu producer trainer sample clean
FORCE:
.PHONY: FORCE env up down scale logs train-gpu test-containers test-autoscale test-docker

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with the project, torch (TORCH_SPEC=torch==2.13.0) and the test tools

$(VENV)/.installed: pyproject.toml Makefile $(TORCH_CHANGED)
	$(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_CHANGED)" ]; then $(PY) -m pip uninstall --quiet --yes torch || true; fi
	@$(PY) -c "import torch" 2>/dev/null || { \
	    echo "$(PY) -m pip install $(TORCH_SPEC)"; \
	    $(PY) -m pip install --quiet "$(TORCH_SPEC)" && echo "$(TORCH_SPEC)" > $(TORCH_STAMP); }
	$(PY) -m pip install --quiet -e ".[trainer,autoscaler,embedded,dev]"
	@touch $@

demo: install ## the main job here: private Redis, 2 producers, a CPU trainer, a sample (CORPUS_PATH=file.txt: local corpus)
	$(PY) -m services.local --preset=tiny --init_from=scratch $(ARGS)

test: install ## every test but the container and chaos suites (real redis-server; slow ones included)
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: install ## the quick tests only (skips those marked slow)
	$(PY) -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test-chaos: install ## chaos suite: Redis and process faults against a real trainer
	$(PY) -m pytest -m chaos $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install ## apply ruff formatting and safe fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: bench-producer bench-trainer bench-autoscaler bench-quality bench-masking ## every CPU benchmark

bench-producer: install ## producer masking/encoding, codec and Redis throughput on one core
	$(PY) -m benchmarks.bench_producer $(ARGS)

bench-trainer: install ## trainer tokens/s fed from Redis vs from memory, and its data-wait share
	$(PY) -m benchmarks.bench_trainer $(ARGS)

bench-autoscaler: install ## the autoscaler policy simulated against changing demand
	$(PY) -m benchmarks.bench_autoscaler $(ARGS)

bench-quality: install ## diffusion ELBO vs the autoregressive baseline's NLL, same preset and tokens (CORPUS_PATH=file.txt)
	$(PY) -m benchmarks.bench_quality $(ARGS)

bench-masking: install ## the ELBO each masking schedule trains at the preset's budget, in-process (CORPUS_PATH=file.txt)
	$(PY) -m benchmarks.bench_masking $(ARGS)

bench-gpu: install ## the reference preset on this machine's GPUs under torchrun, fed by producers: ELBO, tokens/s, MFU, data wait
	$(PY) -m benchmarks.bench_gpu $(ARGS)

producer: install ## one producer against REDIS_URL (pass settings as ARGS="--key=value ...")
	$(PY) -m services.producer $(ARGS)

trainer: install ## one trainer process against REDIS_URL (ARGS="--key=value ...")
	$(PY) -m services.trainer $(ARGS)

sample: install ## text from a checkpoint (CKPT=runs/tiny/ckpt.pt, ARGS="--prompt=... --show_steps")
	$(PY) -m services.trainer.sample --checkpoint=$(or $(CKPT),runs/tiny/ckpt.pt) $(ARGS)

# ---- containers: `docker compose` (Compose v2) where a Docker engine answers, else
# podman-compose; deploy/docker/compose.sh says which it uses, and what to install when
# neither is there (COMPOSE_ENGINE=docker|podman chooses on a machine with both).
COMPOSE := deploy/docker/compose.sh
N ?= 4
PODMAN_COMPOSE_SPEC ?= podman-compose==1.6.0
# AIRGAP=1: no registry. Every image is built on a local Debian base (deploy/compose/airgap.yml;
# `make up` first makes the base with deploy/docker/debian-base.sh, as root, on the engine
# compose.sh picks). Set CORPUS_FILE to a local text file; put a torch CPU wheel in
# deploy/docker/wheels and set TORCH_CPU_INDEX_URL= to build the CPU trainer offline.
AIRGAP ?=
ifneq ($(AIRGAP),)
export COMPOSE_FILES := docker-compose.yml:deploy/compose/airgap.yml
endif

up: env ## start the stack: Redis, producers, CPU trainer, exporter, Prometheus :9090, Grafana :3000 (AIRGAP=1: no registry)
	$(if $(AIRGAP),deploy/docker/debian-base.sh)
	$(COMPOSE) up -d --build
	@bash -c '. deploy/docker/dotenv.sh && at=$$(setting BIND_ADDRESS 127.0.0.1) && { [ "$$at" != 0.0.0.0 ] || at=localhost; } && \
	  echo "Grafana: http://$$at:$$(setting GRAFANA_PORT 3000) (user admin, password in $$(setting SECRETS_DIR .secrets)/grafana-admin), Prometheus: http://$$at:$$(setting PROMETHEUS_PORT 9090)"'

down: ## stop the stack, remove its containers; Redis's data stays (ARGS=-v: every volume emptied)
	$(COMPOSE) down --remove-orphans $(ARGS)

scale: env ## run N producer replicas (make scale N=4)
	deploy/docker/scale.sh $(N)

logs: ## follow the stack's logs (SERVICE=producer: one service)
	$(COMPOSE) logs -f --tail=100 $(SERVICE)

train-gpu: ## torchrun on all local GPUs: GPU trainer container (Docker + NVIDIA toolkit) or natively (TRAIN_GPU_MODE=native)
	PY=$(PY) deploy/docker/train-gpu.sh $(ARGS)

# .env when there is none, and every secret file missing (each run: a deleted one comes back).
env: ## write .env from the settings and secrets (make up and scale call it)
	@deploy/docker/make-env.sh

$(VENV)/.podman-compose: $(VENV)/.installed
	$(PY) -m pip install --quiet "$(PODMAN_COMPOSE_SPEC)"
	@touch $@

# The container tests run on the engine MASKSTREAM_ENGINE names (podman or docker).
test-containers: install $(VENV)/.podman-compose ## container test: images on a local Debian base, stack up (2->3 producers, CPU trainer), checked in Prometheus; root + podman
	MASKSTREAM_CONTAINER_TEST=1 MASKSTREAM_ENGINE=podman $(PY) -m pytest tests/test_containers.py $(PYTEST_ARGS)

test-autoscale: install $(VENV)/.podman-compose ## autoscaler test: the stack on Podman's Docker API, 1 starved producer scaled up, then back to the minimum; root + podman
	MASKSTREAM_CONTAINER_TEST=1 MASKSTREAM_ENGINE=podman $(PY) -m pytest tests/test_autoscale_containers.py $(PYTEST_ARGS)

test-docker: install ## both container tests on Docker Engine: a running dockerd, Compose v2 (docker compose); root
	MASKSTREAM_CONTAINER_TEST=1 MASKSTREAM_ENGINE=docker $(PY) -m pytest \
		tests/test_containers.py tests/test_autoscale_containers.py $(PYTEST_ARGS)

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
