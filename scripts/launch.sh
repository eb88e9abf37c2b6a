# Shared by the training scripts (sourced, not run). Sets the per-device defaults and defines
# launch_training, which starts llava/train/train.py on NUM_GPUS processes.
#
#   DEVICE      gpu (CUDA, or CPU where there is none; the default) or hpu (Intel Gaudi, through
#               optimum-habana's DistributedRunner, bf16, lazy mode, scripts/gaudi_config.json)
#   LAUNCHER    deepspeed (default), torchrun or python (one process) on gpu
#   MASTER_PORT rendezvous port (default 29500; give each concurrent run on a machine its own)
#   DRY_RUN=1   print the command, one argument per line, instead of running it
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

launch_training() {
    local launcher=${LAUNCHER:-deepspeed}
    local port=${MASTER_PORT:-29500}
    local command
    if [ "$DEVICE" = hpu ]; then
        if [ "$(zero_stage "$DEEPSPEED_CONFIG")" = 3 ]; then
            export_hpu_zero3_environment
        fi
        command=(python -m llava.train.gaudi_launch --world_size "$NUM_GPUS" --use_deepspeed
            --master_port "$port" -- llava/train/train.py
            --use_habana True --use_lazy_mode True --gaudi_config_name scripts/gaudi_config.json)
    else
        case "$launcher" in
            deepspeed)
                command=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$port" llava/train/train.py)
                ;;
            torchrun)
                command=(torchrun --nproc_per_node "$NUM_GPUS" --master_port "$port" llava/train/train.py)
                ;;
            python) command=(python -m llava.train.train) ;;
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
