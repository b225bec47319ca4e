#!/usr/bin/env bash
# `make train-gpu`: train on every local GPU, torchrun with one process per GPU.
#
#   TRAIN_GPU_MODE=container  the compose stack with the GPU trainer (profile gpu) instead of
#                             the CPU one: needs Docker Engine with the NVIDIA container
#                             toolkit. Restarts the stack and empties Redis's volume (the
#                             other preset's queue and contract; checkpoints stay, one folder
#                             per preset), so producers write the new preset's contract.
#                             .env then says COMPOSE_PROFILES=gpu (other profiles kept) and
#                             the preset, so `make up` and `make scale` keep the GPU stack;
#                             set both back in .env for the CPU one.
#   TRAIN_GPU_MODE=native     torchrun from .venv on this machine against REDIS_URL (default:
#                             the stack's Redis on localhost:$REDIS_PORT, published with
#                             deploy/compose/publish-redis.yml, as user trainer with the
#                             password file .secrets/redis-trainer),
#                             fed by producers running elsewhere (`make up` with the same
#                             PRESET, or `make producer`). .venv needs a CUDA build of torch.
#   TRAIN_GPU_MODE=auto       (default) container where Docker has the NVIDIA runtime, else
#                             native where torch sees a GPU.
#
# PRESET defaults to char_diffusion; arguments (ARGS) pass on as settings (--key=value).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/docker/dotenv.sh
mode=${TRAIN_GPU_MODE:-auto}
export PRESET=${PRESET:-char_diffusion}  # the command line's, not .env's (the CPU stack's)
py=${PY:-.venv/bin/python}

docker_gpu() {
    command -v docker >/dev/null && timeout 10 docker info --format '{{json .Runtimes}}' 2>/dev/null |
        grep -q nvidia
}
native_gpu() {
    [ -x "$py" ] && "$py" -c 'import sys, torch; sys.exit(torch.cuda.device_count() == 0)' 2>/dev/null
}

if [ "$mode" = auto ]; then
    if docker_gpu; then mode=container; elif native_gpu; then mode=native; else
        cat >&2 <<'MSG'
train-gpu: no GPU found to train on.
  In containers: Docker Engine with the NVIDIA container toolkit
    (nvidia-container-toolkit; `nvidia-ctk runtime configure --runtime=docker`, restart docker).
  Natively: a CUDA build of torch in .venv (`.venv/bin/pip install torch==2.13.0`: PyPI's Linux
    wheels are CUDA builds) on a machine with an NVIDIA driver.
MSG
        exit 1
    fi
fi

case "$mode" in
container)
    deploy/docker/make-env.sh
    # The GPU trainer's profile in place of the CPU one's; any other (autoscale) stays.
    profiles=$(with_trainer gpu "$(setting COMPOSE_PROFILES "")")
    echo "train-gpu: compose stack with the GPU trainer, preset $PRESET, profiles $profiles"
    COMPOSE_PROFILES=cpu,autoscale,$profiles deploy/docker/compose.sh down --remove-orphans
    # Redis keeps its data on a volume (append-only file): a new preset needs it empty.
    "$(deploy/docker/compose.sh --engine)" volume rm -f \
        "$(setting COMPOSE_PROJECT_NAME maskstream)_redis-data" >/dev/null 2>&1 || true  # none yet
    set_dotenv COMPOSE_PROFILES "$profiles"
    set_dotenv PRESET "$PRESET"
    echo "train-gpu: .env now says COMPOSE_PROFILES=$profiles and PRESET=$PRESET"
    COMPOSE_PROFILES=$profiles deploy/docker/compose.sh up -d --build
    echo "train-gpu: follow it with: make logs SERVICE=trainer"
    ;;
native)
    if [ -z "${REDIS_URL:-}" ]; then
        # Only what names the stack's Redis comes from .env: the rest of it is the stack's.
        export REDIS_URL="redis://localhost:$(setting REDIS_PORT 6379)/0"
        if [ -z "${REDIS_PASSWORD:-}${REDIS_PASSWORD_FILE:-}" ]; then
            export REDIS_USERNAME=${REDIS_USERNAME:-trainer}
            export REDIS_PASSWORD_FILE=$(setting SECRETS_DIR .secrets)/redis-trainer
        fi
    fi
    native_gpu || {
        echo "train-gpu: torch in $py sees no GPU (install a CUDA build of torch there)" >&2
        exit 1
    }
    echo "train-gpu: torchrun on $("$py" -c 'import torch; print(torch.cuda.device_count())') GPU(s), preset $PRESET, redis $REDIS_URL"
    exec "$py" -m services.trainer.launch --nproc_per_node=gpu "$@"
    ;;
*)
    echo "train-gpu: TRAIN_GPU_MODE must be auto, container or native (not $mode)" >&2
    exit 2
    ;;
esac
