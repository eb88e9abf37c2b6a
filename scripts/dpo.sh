#!/usr/bin/env bash
# Stage 3, preference tuning (DPO) of a stage-2 model on chosen/rejected pairs (RLHF-V /
# LLaVA-NeXT DPO JSON, or OpenAI messages pairs; see llava/data/preference.py): LoRA adapters
# on the language model by default (the reference is the model with its adapters disabled),
# the whole language model with FULL=1 (the reference is a frozen copy). The projector stays
# frozen. Sigmoid loss with beta 0.1 (--dpo_loss ipo|robust, --label_smoothing,
# --reference_free override it). A transformers image-text-to-text model (Qwen2-VL, Idefics3,
# Gemma 3, ...) trains through its own processor and chat template: VERSION=auto MODEL_BASE=
# (MODEL_BASE naming the VLM folder where MODEL_NAME_OR_PATH is a LoRA output of it).
# Hardware: a 7B LoRA run fits 8x A100-40G at 8 pairs per GPU (global batch 64); RLHF-V's
# 5.7K pairs take well under an hour there.
# Environment: MODEL_NAME_OR_PATH (the stage-2 output: a full model, or a LoRA output with
# MODEL_BASE naming its base LLM, as --model-base does for the eval commands), DATA_PATH,
# IMAGE_FOLDER, OUTPUT_DIR, VERSION (the chat template: v1, or auto), IMAGE_ASPECT_RATIO (pad;
# anyres or anyres_max_N for a composed model trained with AnyRes), NUM_GPUS,
# DEEPSPEED_CONFIG, PER_DEVICE_BATCH, GRAD_ACCUM, FULL, LAUNCHER (deepspeed, torchrun or
# python), MASTER_PORT, DRY_RUN=1 (print the command) and the several-machine variables, as
# in scripts/launch.sh (DEVICE=gpu only). Arguments given to this script are appended last and
# override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/launch.sh

MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-checkpoints/llava-v1.5-7b-lora}
MODEL_BASE=${MODEL_BASE-lmsys/vicuna-7b-v1.5}
DATA_PATH=${DATA_PATH:-finetuning_data/rlhf_v_dpo.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-finetuning_data/images}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/llava-v1.5-7b-dpo}
NUM_GPUS=${NUM_GPUS:-8}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-scripts/zero3.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-8}  # pairs: 8 GPUs x 8 = 64
GRAD_ACCUM=${GRAD_ACCUM:-1}
FULL=${FULL:-0}
VERSION=${VERSION:-v1}
IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-pad}  # an AnyRes model: the value its config holds

if [ "$DEVICE" != gpu ]; then
    echo "scripts/dpo.sh runs with DEVICE=gpu (CUDA, or CPU where there is none)" >&2
    exit 2
fi

optional_flags=()
if [ -n "$MODEL_BASE" ]; then optional_flags+=(--model_base "$MODEL_BASE"); fi
if [ "$FULL" = 1 ]; then
    mode_flags=(--lora_enable False --learning_rate 5e-7)
else
    mode_flags=(--lora_enable True --lora_r 128 --lora_alpha 256 --learning_rate 2e-5)
fi

arguments=(
    "${mode_flags[@]}"
    --freeze_mm_mlp_adapter True
    --beta 0.1
    --dpo_loss sigmoid
    --deepspeed "$DEEPSPEED_CONFIG"
    --model_name_or_path "$MODEL_NAME_OR_PATH"
    "${optional_flags[@]}"
    --version "$VERSION"
    --data_path "$DATA_PATH"
    --image_folder "$IMAGE_FOLDER"
    --image_aspect_ratio "$IMAGE_ASPECT_RATIO"
    --group_by_modality_length True
    --bf16 True
    --output_dir "$OUTPUT_DIR"
    --num_train_epochs 1
    --per_device_train_batch_size "$PER_DEVICE_BATCH"
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --save_strategy steps
    --save_steps 500
    --save_total_limit 1
    --weight_decay 0.
    --warmup_ratio 0.1
    --lr_scheduler_type cosine
    --logging_steps 1
    --tf32 "$TF32"
    --model_max_length 2048
    --gradient_checkpointing True
    --dataloader_num_workers 4
    --report_to none
    "$@"
)
TRAINING_ENTRY=llava.train.dpo launch_training "${arguments[@]}"
