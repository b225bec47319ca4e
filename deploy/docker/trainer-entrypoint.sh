#!/bin/sh
# Start the trainer: torchrun with NPROC_PER_NODE processes ("gpu" = one per visible GPU),
# or one plain process when NPROC_PER_NODE=1. After a restart (the container's or the
# machine's) it resumes from OUT_DIR/ckpt.pt instead of starting over; set INIT_FROM to
# choose yourself. Arguments are passed on as settings (--key=value).
set -eu
if [ -z "${INIT_FROM:-}" ]; then
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
