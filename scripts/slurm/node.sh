#!/usr/bin/env bash
# One node's part of scripts/slurm/train.sbatch (run by srun, one task per node): this node's
# NODE_RANK from SLURM_NODEID and, for LAUNCHER=deepspeed, a hostfile of the job's nodes
# (NUM_GPUS slots each, default 8), then the stage script with the remaining arguments.
set -euo pipefail
export NODE_RANK=$SLURM_NODEID
if [ "${LAUNCHER:-deepspeed}" = deepspeed ] && [ -z "${HOSTFILE:-}" ]; then
    HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/llava-hostfile.XXXXXX")
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${NUM_GPUS:-8}/" >"$HOSTFILE"
    export HOSTFILE
fi
stage_script=$1
shift
exec bash "$stage_script" "$@"
