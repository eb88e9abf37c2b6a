# Shared by the training scripts (sourced, not run): start llava/train/train.py on NUM_GPUS
# processes with the launcher LAUNCHER (deepspeed, torchrun or python). With DRY_RUN=1 the
# command is printed, one argument per line, instead of run.

launch_training() {
    local launcher=${LAUNCHER:-deepspeed}
    local command
    case "$launcher" in
        deepspeed) command=(deepspeed --num_gpus "$NUM_GPUS" llava/train/train.py) ;;
        torchrun) command=(torchrun --nproc_per_node "$NUM_GPUS" llava/train/train.py) ;;
        python) command=(python -m llava.train.train) ;;
        *)
            echo "LAUNCHER must be deepspeed, torchrun or python, not '$launcher'" >&2
            return 2
            ;;
    esac
    if [ "${DRY_RUN:-0}" = "1" ]; then
        printf '%s\n' "${command[@]}" "$@"
        return 0
    fi
    "${command[@]}" "$@"
}
