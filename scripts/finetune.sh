#!/usr/bin/env bash
# Stage 2 of LLaVA-1.5 (visual instruction tuning, full): trains the projector and the whole
# language model on the 665K instruction mixture, starting from stage 1's mm_projector.bin.
# Paper hardware and time: 8x A100-40G, about 10 h for 7B (20 h for 13B), global batch 128.
# Override paths and sizes from the environment (MODEL_NAME_OR_PATH, VISION_TOWER, DATA_PATH,
# IMAGE_FOLDER, PRETRAIN_MM_MLP_ADAPTER, OUTPUT_DIR, NUM_GPUS, DEEPSPEED_CONFIG,
# PER_DEVICE_BATCH, GRAD_ACCUM, LAUNCHER, DEVICE=gpu|hpu: see scripts/launch.sh); arguments
# given to this script are appended last and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/launch.sh

MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER-openai/clip-vit-large-patch14-336}
DATA_PATH=${DATA_PATH:-finetuning_data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-finetuning_data/images}
PRETRAIN_MM_MLP_ADAPTER=${PRETRAIN_MM_MLP_ADAPTER-checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/llava-v1.5-7b}
NUM_GPUS=${NUM_GPUS:-8}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-scripts/zero3${ZERO_SUFFIX}.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-16}  # 8 GPUs x 16 = 128
GRAD_ACCUM=${GRAD_ACCUM:-1}

# Set empty to leave a flag out: VISION_TOWER= PRETRAIN_MM_MLP_ADAPTER= when MODEL_NAME_OR_PATH
# names a complete vision-language model (a llava-hf folder), which brings its own tower.
optional_flags=()
if [ -n "$VISION_TOWER" ]; then optional_flags+=(--vision_tower "$VISION_TOWER"); fi
if [ -n "$PRETRAIN_MM_MLP_ADAPTER" ]; then
    optional_flags+=(--pretrain_mm_mlp_adapter "$PRETRAIN_MM_MLP_ADAPTER")
fi

launch_training \
    --deepspeed "$DEEPSPEED_CONFIG" \
    --model_name_or_path "$MODEL_NAME_OR_PATH" \
    --version v1 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    "${optional_flags[@]}" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 "$TF32" \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to none \
    "$@"
