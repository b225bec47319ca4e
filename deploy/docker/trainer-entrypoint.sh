#!/bin/sh
# Start the trainer: torchrun with NPROC_PER_NODE processes ("gpu" = one per visible GPU),
# or one plain process when NPROC_PER_NODE=1. After a restart (the container's or the
# machine's) it resumes from OUT_DIR/ckpt.pt instead of starting over; set INIT_FROM to
# choose yourself. Arguments are passed on as settings (--key=value).
set -eu
if [ -z "${INIT_FROM:-}" ]; then
    # Checkpoints lived in /runs/<run> before the stack kept one folder per preset
    # (/runs/<preset>/<run>): such a one is not started over silently.
    # (OUT_DIR is <root>/<preset>/<run> in the stack: the earlier place is <root>/<run>.)
    earlier="$(dirname "$(dirname "${OUT_DIR:-runs/default}")")/${RUN_NAME:-default}/ckpt.pt"
    if [ ! -f "${OUT_DIR:-runs/default}/ckpt.pt" ] && [ -f "$earlier" ]; then
        echo "trainer-entrypoint: $earlier is a checkpoint from before checkpoints moved to" \
            "${OUT_DIR:-}: move it there to resume it (make down; then e.g. docker compose" \
            "run --rm --entrypoint sh trainer-cpu -c 'mkdir -p ${OUT_DIR:-} && mv $earlier" \
            "${OUT_DIR:-}/'), or set INIT_FROM=scratch to start over" >&2
        exit 2
    fi
    if [ -f "${OUT_DIR:-runs/default}/ckpt.pt" ]; then INIT_FROM=resume; else INIT_FROM=scratch; fi
    export INIT_FROM
fi
echo "trainer-entrypoint: init_from=$INIT_FROM, out_dir=${OUT_DIR:-runs/default}, processes=${NPROC_PER_NODE:-gpu}"
if [ "${NPROC_PER_NODE:-gpu}" = 1 ]; then
    exec python -m services.trainer "$@"
fi
# The launcher runs torchrun and stops it cleanly: on SIGTERM the ranks checkpoint and the
# container exits 0 (plain torchrun exits 1 after forwarding a SIGTERM).
exec python -m services.trainer.launch --nproc_per_node="${NPROC_PER_NODE:-gpu}" "$@"
