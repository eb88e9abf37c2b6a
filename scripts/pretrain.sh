#!/usr/bin/env bash
# Stage 1 of LLaVA-1.5 (feature alignment): trains only the projector (mlp2x_gelu) on the 558K
# LAION/CC/SBU image-caption pairs, with CLIP ViT-L/336 and Vicuna-v1.5 frozen.
# Paper hardware and time: 8x A100-80G, about 3.5 h for 7B (5.5 h for 13B), global batch 256.
# Override paths and sizes from the environment (MODEL_NAME_OR_PATH, VISION_TOWER, DATA_PATH,
# IMAGE_FOLDER, OUTPUT_DIR, NUM_GPUS, DEEPSPEED_CONFIG, PER_DEVICE_BATCH, GRAD_ACCUM, LAUNCHER,
# DEVICE=gpu|hpu: see scripts/launch.sh);
# arguments given to this script are appended last and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/launch.sh

MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER-openai/clip-vit-large-patch14-336}
DATA_PATH=${DATA_PATH:-pretraining_data/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-pretraining_data/images}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/llava-v1.5-7b-pretrain}
NUM_GPUS=${NUM_GPUS:-8}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-scripts/zero2${ZERO_SUFFIX}.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}  # 8 GPUs x 32 = 256
GRAD_ACCUM=${GRAD_ACCUM:-1}

# Set empty to leave a flag out: VISION_TOWER= PRETRAIN_MM_MLP_ADAPTER= when MODEL_NAME_OR_PATH
# names a complete vision-language model (a llava-hf folder), which brings its own tower.
optional_flags=()
if [ -n "$VISION_TOWER" ]; then optional_flags+=(--vision_tower "$VISION_TOWER"); fi

launch_training \
    --deepspeed "$DEEPSPEED_CONFIG" \
    --model_name_or_path "$MODEL_NAME_OR_PATH" \
    --version plain \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    "${optional_flags[@]}" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 1e-3 \
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
