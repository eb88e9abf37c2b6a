#!/usr/bin/env bash
# The embedded demo: a tiny LLaVA learns to read handwritten digits, both training stages, on a
# CPU, with nothing downloaded. It builds a random CLIP tower (32 px) and a random 2-layer Llama
# (width 256) with a tokenizer trained here; writes scikit-learn's 1,797 digit scans as a LLaVA
# dataset (captions, chats, a held-out test split); runs scripts/pretrain.sh and then
# scripts/finetune_lora.sh through DeepSpeed on 2 CPU processes; answers the held-out questions,
# scores them per question type and draws a report (loss curves, test examples).
# Hardware and time: 2 CPU cores, no GPU, under 10 minutes (the very first DeepSpeed run on a
# machine adds about a minute to compile its CPU communication op). Held-out "which digit"
# accuracy: about 95%; the two-image comparison: about 92%. Run it with the project installed
# (see README.md):
#
#     bash scripts/demo.sh
#
# Environment: DEMO_DIR (checkpoints, answers, report; default playground/demo), DEMO_DATA_DIR
# (dataset; default playground/data/digits), DEMO_QUICK=1 (3 steps per stage on a slice of the
# data: checks every step runs, in about 2 minutes; the model learns nothing), MASTER_PORT
# (DeepSpeed's rendezvous port; default: a free one).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
demo_dir=$(realpath -m "${DEMO_DIR:-$repo/playground/demo}")
data_dir=$(realpath -m "${DEMO_DATA_DIR:-$repo/playground/data/digits}")
cd "$repo"

step() { printf '\n==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

if [ "${DEMO_QUICK:-0}" = "1" ]; then
    data_limits=(--train-limit 64 --test-limit 8)
    stage1_schedule=(--max_steps 3 --logging_steps 1)
    stage2_schedule=(--max_steps 3 --logging_steps 1)
else
    data_limits=()
    stage1_schedule=(--num_train_epochs 10 --logging_steps 5)
    stage2_schedule=(--num_train_epochs 4 --logging_steps 5)
fi
# What both stages override in the scripts: fp32 (bf16 is slower on CPU), no gradient
# checkpointing (the model is small), data loaded in the training process (2 cores), short
# sequences (16 image tokens and a few words), and only the final model saved.
cpu_flags=(--bf16 False --tf32 False --gradient_checkpointing False --dataloader_num_workers 0
    --model_max_length 128 --save_strategy no)

stage1=$demo_dir/stage1-pretrain
stage2=$demo_dir/stage2-lora
answers=$demo_dir/test_answers.jsonl
report=$demo_dir/report
rm -rf "$stage1" "$stage2" "$answers" "$report" # model_vqa would keep a previous run's answers

step "1/6 Dataset: scikit-learn digits as PNGs, captions, chats and a held-out test split"
python -m playground.digits.data --out "$data_dir" "${data_limits[@]}"

step "2/6 Starting checkpoints: random CLIP and Llama, a tokenizer trained on the dataset's text"
python -m playground.digits.checkpoints --out "$demo_dir"

export MODEL_NAME_OR_PATH=$demo_dir/llama VISION_TOWER=$demo_dir/clip IMAGE_FOLDER=$data_dir
export NUM_GPUS=2 GRAD_ACCUM=1 PER_DEVICE_BATCH=16 # global batch 32
export MASTER_PORT=${MASTER_PORT:-$(free_port)}

step "3/6 Stage 1: the projector learns to caption ('a handwritten seven'); CLIP and Llama frozen"
# The paper's recipe with a higher learning rate and more epochs: 1,437 captions, not 558K.
DATA_PATH=$data_dir/pretrain.json OUTPUT_DIR=$stage1 \
    bash scripts/pretrain.sh "${cpu_flags[@]}" "${stage1_schedule[@]}" --learning_rate 3e-3

step "4/6 Stage 2: LoRA (r 128, alpha 256, as the paper) and the projector learn to chat"
# The LLM starts random and gets 4 epochs, so LoRA learns at 1e-3 (paper: 2e-4; 2e-3 did worse
# here); the projector, trained in stage 1, moves ten times slower, as in the paper.
export PRETRAIN_MM_MLP_ADAPTER=$stage1/mm_projector.bin
DATA_PATH=$data_dir/finetune.json OUTPUT_DIR=$stage2 \
    bash scripts/finetune_lora.sh "${cpu_flags[@]}" "${stage2_schedule[@]}" \
    --learning_rate 1e-3 --mm_projector_lr 1e-4

step "5/6 Held-out test: answer every question about images never seen in training"
# One thread: on small batches a second one mostly waits, and when anything else runs on the
# two cores, two threads per process ran 20x slower here.
OMP_NUM_THREADS=1 python -m llava.eval.model_vqa \
    --model-path "$stage2" --model-base "$demo_dir/llama" \
    --question-file "$data_dir/test_questions.jsonl" --image-folder "$data_dir" \
    --answers-file "$answers" --conv-mode v1 --temperature 0 --batch-size 16 --max-new-tokens 8
mkdir -p "$report"
python -m llava.eval.scores --answers-file "$answers" \
    --annotation-file "$data_dir/test_annotations.jsonl" | tee "$report/scores.txt"

step "6/6 Report: loss curves and test examples"
python -m playground.digits.report --stage-dirs "$stage1" "$stage2" --answers-file "$answers" \
    --annotation-file "$data_dir/test_annotations.jsonl" --image-folder "$data_dir" --out "$report"

echo "Done in $((SECONDS / 60)) min $((SECONDS % 60)) s. Accuracy per question type above;"
echo "checkpoints in $demo_dir, report in $report."
