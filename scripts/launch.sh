# Shared by the training scripts (sourced, not run). Sets the per-device defaults and defines
# launch_training, which starts the training entry on NUM_GPUS processes per machine:
# llava/train/train.py, or the module a script names in TRAINING_ENTRY (llava.train.dpo).
#
#   DEVICE      gpu (CUDA, or CPU where there is none; the default) or hpu (Intel Gaudi, through
#               optimum-habana's DistributedRunner, bf16, lazy mode, scripts/gaudi_config.json)
#   LAUNCHER    deepspeed (default), torchrun or python (one process) on gpu
#   MASTER_PORT rendezvous port (default 29500; give each concurrent run on a machine its own)
#   DRY_RUN=1   print the command, one argument per line, instead of running it
#
# Several machines (NUM_GPUS is then the number of processes on each; see README "Several
# machines" and scripts/slurm/; the output folder must be one folder every machine sees,
# docs/reliability.md):
#   NNODES       number of machines (default 1)
#   NODE_RANK    this machine's index, 0 to NNODES-1 (each machine runs the script itself)
#   MASTER_ADDR  address of machine 0, reachable from every machine
#   RDZV_BACKEND torchrun only: c10d for a dynamic rendezvous at MASTER_ADDR:MASTER_PORT
#                (ranks of machines assigned on arrival, NODE_RANK not needed; RDZV_ID names
#                the job, default SLURM_JOB_ID or llava); unset: static (NODE_RANK required)
#   HOSTFILE     deepspeed only: MPI-style hostfile ("worker-1 slots=8" a line; absolute, or
#                relative to the repository root, where the scripts run). Without
#                NODE_RANK the deepspeed launcher starts every machine from this one over
#                passwordless ssh (pdsh); with NODE_RANK each machine runs the script itself
#                (deepspeed --no_ssh). The deepspeed launcher knows other machines only through
#                a hostfile: NNODES > 1 without HOSTFILE is refused (use LAUNCHER=torchrun).
#
# The scripts read ZERO_SUFFIX (the Gaudi variants of the ZeRO configs: bf16 only, no
# overlap_comm) and TF32 (optimum-habana rejects --tf32) from here.

DEVICE=${DEVICE:-gpu}
case "$DEVICE" in
    gpu)
        ZERO_SUFFIX=""
        TF32=${TF32:-True}
        ;;
    hpu)
        ZERO_SUFFIX="_gaudi"
        TF32=False
        export PT_HPU_LAZY_MODE=${PT_HPU_LAZY_MODE:-1}
        ;;
    *)
        echo "DEVICE must be gpu or hpu, not '$DEVICE'" >&2
        exit 2
        ;;
esac

# The ZeRO stage a DeepSpeed config file asks for (read from the file, not its name).
zero_stage() {
    python -c 'import json, sys; print(json.load(open(sys.argv[1]))["zero_optimization"]["stage"])' "$1"
}

# Gaudi settings ZeRO-3 needs: smaller compound ops and a mark_step per parameter gather.
export_hpu_zero3_environment() {
    export PT_HPU_MAX_COMPOUND_OP_SIZE=${PT_HPU_MAX_COMPOUND_OP_SIZE:-10}
    export DEEPSPEED_HPU_ZERO3_SYNC_MARK_STEP_REQUIRED=${DEEPSPEED_HPU_ZERO3_SYNC_MARK_STEP_REQUIRED:-1}
}

# The deepspeed launcher's options for NNODES, NODE_RANK, MASTER_ADDR and HOSTFILE (none on one
# machine without a hostfile).
deepspeed_node_options() {
    local nnodes=${NNODES:-1}
    if [ -z "${HOSTFILE:-}" ]; then
        if [ "$nnodes" != 1 ] || [ -n "${NODE_RANK:-}" ]; then
            echo "NNODES=$nnodes${NODE_RANK:+ NODE_RANK=$NODE_RANK}: the deepspeed launcher" \
                "reaches other machines only through a hostfile; set HOSTFILE, or use" \
                "LAUNCHER=torchrun with NNODES, NODE_RANK and MASTER_ADDR" >&2
            return 2
        fi
        return 0
    fi
    if [ ! -f "$HOSTFILE" ]; then
        echo "HOSTFILE=$HOSTFILE: no such file" >&2
        return 2
    fi
    node_options=(--hostfile "$HOSTFILE")
    if [ "$nnodes" != 1 ]; then node_options+=(--num_nodes "$nnodes"); fi
    if [ -n "${MASTER_ADDR:-}" ]; then node_options+=(--master_addr "$MASTER_ADDR"); fi
    if [ -n "${NODE_RANK:-}" ]; then node_options+=(--no_ssh --node_rank "$NODE_RANK"); fi
}

# torchrun's options for NNODES, NODE_RANK, MASTER_ADDR and RDZV_BACKEND (none on one machine).
torchrun_node_options() {
    local nnodes=${NNODES:-1}
    local port=$1
    if [ "${RDZV_BACKEND:-}" = c10d ]; then
        if [ -z "${MASTER_ADDR:-}" ]; then
            echo "RDZV_BACKEND=c10d needs MASTER_ADDR (the rendezvous host)" >&2
            return 2
        fi
        node_options=(--nnodes "$nnodes" --rdzv_backend c10d
            --rdzv_endpoint "$MASTER_ADDR:$port" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-llava}}")
        return 0
    elif [ -n "${RDZV_BACKEND:-}" ]; then
        echo "RDZV_BACKEND must be c10d or unset (static rendezvous), not '$RDZV_BACKEND'" >&2
        return 2
    fi
    if [ "$nnodes" = 1 ] && [ -z "${NODE_RANK:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
        return 0
    fi
    if [ "$nnodes" != 1 ] && { [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; }; then
        echo "NNODES=$nnodes with torchrun's static rendezvous needs NODE_RANK and MASTER_ADDR" \
            "(or RDZV_BACKEND=c10d with MASTER_ADDR)" >&2
        return 2
    fi
    node_options=(--nnodes "$nnodes" --node_rank "${NODE_RANK:-0}"
        --master_addr "${MASTER_ADDR:-127.0.0.1}")
}

launch_training() {
    local launcher=${LAUNCHER:-deepspeed}
    local port=${MASTER_PORT:-29500}
    local entry=${TRAINING_ENTRY:-llava.train.train}
    local entry_file=${entry//.//}.py
    local command
    local node_options=()
    if [ "$DEVICE" = hpu ]; then
        if [ "${NNODES:-1}" != 1 ] || [ -n "${HOSTFILE:-}" ]; then
            echo "DEVICE=hpu runs on one machine here (NNODES, HOSTFILE are for DEVICE=gpu)" >&2
            return 2
        fi
        if [ "$(zero_stage "$DEEPSPEED_CONFIG")" = 3 ]; then
            export_hpu_zero3_environment
        fi
        command=(python -m llava.train.gaudi_launch --world_size "$NUM_GPUS" --use_deepspeed
            --master_port "$port" -- "$entry_file"
            --use_habana True --use_lazy_mode True --gaudi_config_name scripts/gaudi_config.json)
    else
        case "$launcher" in
            deepspeed)
                deepspeed_node_options || return
                command=(deepspeed "${node_options[@]}" --num_gpus "$NUM_GPUS"
                    --master_port "$port" "$entry_file")
                ;;
            torchrun)
                torchrun_node_options "$port" || return
                command=(torchrun "${node_options[@]}" --nproc_per_node "$NUM_GPUS"
                    --master_port "$port" "$entry_file")
                ;;
            python)
                if [ "${NNODES:-1}" != 1 ]; then
                    echo "LAUNCHER=python starts one process; NNODES needs deepspeed or torchrun" >&2
                    return 2
                fi
                command=(python -m "$entry")
                ;;
            *)
                echo "LAUNCHER must be deepspeed, torchrun or python, not '$launcher'" >&2
                return 2
                ;;
        esac
    fi
    if [ "${DRY_RUN:-0}" = "1" ]; then
        printf '%s\n' "${command[@]}" "$@"
        return 0
    fi
    "${command[@]}" "$@"
}
