"""Stage 3, preference tuning (DPO) of a stage-2 model: parse -> load -> stage -> LoRA -> pairs ->
trainer -> save.

Runs as `python -m llava.train.dpo` (or `deepspeed llava/train/dpo.py`, see scripts/dpo.sh)
with train.py's flags plus DPOArguments. --model_name_or_path names the stage-2 result: a full
model, or a LoRA output with --model_base naming its base (opened and merged by
llava.model.builder.load_pretrained_model, as the eval commands' --model-base does). That is
the composed model, or a transformers image-text-to-text model (Qwen2-VL, Idefics3, Gemma 3,
...) with its own processor and chat template (--version auto, or left out), whose pairs go
through its processor (llava/data/processor_preference.py) and whose log-probabilities come
from its own forward (llava/train/dpo_vlm.py). A llava-hf folder opens as the composed model,
as it does for stage 2.

The reference model is the frozen starting point:
- with --lora_enable, the same model with its adapters disabled (peft's disable_adapter()), so
  no second copy of the weights; the vision tower and projector (connector) must then stay
  frozen (--freeze_mm_mlp_adapter True), or the reference would move with them;
- in full fine-tuning, a frozen copy made before training (one more copy of the weights on
  each process; under ZeRO-3 it is not partitioned);
- with --reference_free, none.
Everything else (sampler, optimizer groups, checkpoints, resume, preemption, throughput logs)
is stage 2's trainer (llava/train/trainer.py). A composed model trained with AnyRes
(--image_aspect_ratio anyres or anyres_max_N, as its config says) tiles the pairs' images as
stage 2 does (llava/data/anyres_preference.py). Not implemented here: videos in pairs,
prompt+suffix processors (PaliGemma, Fuyu), QLoRA (--bits 4/8), validation splits.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from llava.data.media import is_anyres
from llava.data.preference import build_preference_data
from llava.data.processor_preference import IMAGE_INPUTS, build_processor_preference_data
from llava.model.builder import load_pretrained_model
from llava.model.kinds import CONNECTOR, VISION, unwrap_base
from llava.model.llava import LlavaForCausalLM
from llava.train.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    check_choice,
    check_world_size,
)
from llava.train.dpo_loss import DPO_LOSSES, preference_loss, sequence_log_probs
from llava.train.preemption import PreemptionCallback
from llava.train.run_folder import lock_output_dir, run_flags
from llava.train.stages import TRAINS, StagePlan, trainable_table
from llava.train.train import (
    check_flags_for_processor_model,
    check_text_only_steps,
    compute_dtype,
    finish_model,
    list_skipped_records,
    nothing_left_to_train,
    prepare_model,
    processor_tokenizer,
    run_entry,
    seed_and_checkpointing,
    stage_plan_of,
    start_run,
    template_of,
    train_with_preemption,
)
from llava.train.trainer import LlavaTrainer

logger = logging.getLogger("llava.train.dpo")


@dataclass
class DPOArguments:
    beta: float = field(
        default=0.1,
        metadata={"help": "DPO's beta: how far the policy may move from the reference."},
    )
    dpo_loss: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid (DPO), ipo (IPO) or robust (rDPO, with --label_smoothing)."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "The assumed share of flipped labels (cDPO for sigmoid, rDPO for robust)."
        },
    )
    reference_free: bool = field(
        default=False,
        metadata={"help": "No reference model: its log-probabilities are taken as 0."},
    )
    model_base: str | None = field(
        default=None,
        metadata={
            "help": "The base LLM of a LoRA --model_name_or_path (as the eval --model-base)."
        },
    )

    def __post_init__(self):
        check_choice("dpo_loss", self.dpo_loss, DPO_LOSSES)
        if self.beta <= 0:
            raise ValueError(f"--beta must be above 0, not {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), not {self.label_smoothing}")
        if self.label_smoothing and self.dpo_loss == "ipo":
            raise ValueError("--label_smoothing applies to the sigmoid and robust losses, not ipo")


DPO_FLAGS = ("beta", "dpo_loss", "label_smoothing", "reference_free", "model_base")


def parse_dpo_arguments(
    args: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, DPOArguments]:
    """train.py's flags plus DPOArguments; unknown flags are an error that names them."""
    argv = sys.argv[1:] if args is None else list(args)
    parser = transformers.HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments, DPOArguments)
    )
    parsed = parser.parse_args_into_dataclasses(args=argv)
    check_world_size(parsed[2])
    return parsed


# -- the trainer --------------------------------------------------------------------------------
class DPOTrainer(LlavaTrainer):
    """Stage 2's trainer with DPO's loss; logs the loss, the rewards (chosen, rejected, margin),
    the accuracy of chosen over rejected and both log-probabilities, plus pairs_per_second
    beside stage 2's throughput fields (whose samples are sequences, two per pair)."""

    def __init__(self, *args: Any, dpo: DPOArguments, reference_model=None, **kwargs: Any):
        self.dpo = dpo
        self.reference_model = reference_model
        self.preference_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        super().__init__(*args, **kwargs)
        # The loss is a mean over a micro-batch's pairs: the trainer divides it by the
        # accumulation steps (no compute_loss_func, no num_items_in_batch normalisation).
        self.compute_loss_func = None
        self.loss_is_scaled_for_ga = False
        if reference_model is not None:
            reference_model.to(self.args.device)

    def reference_log_probs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.dpo.reference_free:
            return None
        with torch.no_grad():
            if self.reference_model is not None:
                return sequence_log_probs(self.reference_model, inputs)
            with self.model.disable_adapter():
                return sequence_log_probs(self.model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = sequence_log_probs(self.model, inputs)  # (2B,); self.model: not an engine
        reference = self.reference_log_probs(inputs)
        pairs = policy.shape[0] // 2
        result = preference_loss(
            policy[:pairs],
            policy[pairs:],
            None if reference is None else reference[:pairs],
            None if reference is None else reference[pairs:],
            beta=self.dpo.beta,
            loss_type=self.dpo.dpo_loss,
            label_smoothing=self.dpo.label_smoothing,
        )
        loss = result.losses.mean()
        if self.model.training:
            self.store_metrics(result, policy.detach(), pairs)
            # a text-only batch still reaches trainable image parts (image-text-to-text kind)
            images = inputs.get(IMAGE_INPUTS, inputs)
            loss = self.model_kind.with_image_path(self.model, images, loss, self.image_path_inputs)
        return (loss, {"policy_log_probs": policy}) if return_outputs else loss

    def store_metrics(self, result, policy: torch.Tensor, pairs: int) -> None:
        """Kept on the device until the next log (no sync per step)."""
        chosen, rejected = result.chosen_rewards, result.rejected_rewards
        metrics = self.preference_metrics
        metrics["rewards/chosen"].append(chosen.mean())
        metrics["rewards/rejected"].append(rejected.mean())
        metrics["rewards/margins"].append((chosen - rejected).mean())
        metrics["rewards/accuracies"].append((chosen > rejected).float().mean())
        metrics["logps/chosen"].append(policy[:pairs].mean())
        metrics["logps/rejected"].append(policy[pairs:].mean())

    def preference_logs(self) -> dict[str, float]:
        """The stored metrics' means since the last log, averaged over the processes."""
        if not self.preference_metrics:
            return {}
        names = sorted(self.preference_metrics)
        means = torch.stack([torch.stack(self.preference_metrics[n]).mean() for n in names])
        self.preference_metrics.clear()
        if self.args.world_size > 1:
            means = means.to(self.args.device)
            torch.distributed.all_reduce(means)
            means = means / self.args.world_size
        return {name: round(value, 6) for name, value in zip(names, means.tolist())}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log, reached by every process at the same step
            logs.update(self.preference_logs())
        super().log(logs, *args, **kwargs)

    def add_throughput_metrics(self, logs: dict[str, float]) -> None:
        super().add_throughput_metrics(logs)
        if "samples_per_second" in logs:
            logs["pairs_per_second"] = round(logs["samples_per_second"] / 2, 3)

    def evaluate(self, *args, **kwargs):
        raise NotImplementedError("DPO runs have no validation loss (no --validation_split)")


# -- the entry ----------------------------------------------------------------------------------
def load_policy(
    model_args: ModelArguments,
    data_args: DataArguments,
    dpo_args: DPOArguments,
    args: TrainingArguments,
):
    """(the stage-2 model, merged where it was a LoRA output; its tokenizer; its processor, for
    an image-text-to-text model, else None)."""
    if args.bits != 16:
        raise ValueError(f"--bits {args.bits}: QLoRA is not implemented for DPO; use --bits 16")
    with whole_weights(args):
        loaded = load_pretrained_model(
            model_args.model_name_or_path,
            dpo_args.model_base,
            torch_dtype=compute_dtype(args),
            vision_tower=model_args.vision_tower,
        )
    if loaded.processor is not None:
        check_flags_for_processor_model(model_args, data_args, args)
        tokenizer = processor_tokenizer(loaded.processor, args.model_max_length)
        return finish_model(loaded.model, args, None), tokenizer, loaded.processor
    if not isinstance(loaded.model, LlavaForCausalLM):
        raise ValueError(
            f"{model_args.model_name_or_path}: a {type(loaded.model).__name__} without its "
            "processor; DPO runs on the composed LLaVA model or an image-text-to-text model"
        )
    tokenizer = loaded.tokenizer
    tokenizer.model_max_length = args.model_max_length
    tokenizer.padding_side = "right"
    return finish_model(loaded.model, args, None), tokenizer, None


@contextmanager
def whole_weights(args: TrainingArguments) -> Iterator[None]:
    """Load without ZeRO-3's partitioned construction: a LoRA stage-2 output is merged into its
    base's weights, which needs them whole; the engine partitions them when training starts."""
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(args.hf_deepspeed_config)


def check_reference(plan: StagePlan, dpo_args: DPOArguments) -> None:
    """With LoRA the reference is the model with adapters off: nothing else may train."""
    if plan.lora and not dpo_args.reference_free:
        moving = [role for role in (VISION, CONNECTOR) if plan.mode(role) == TRAINS]
        if moving:
            raise ValueError(
                f"--lora_enable with the {' and '.join(moving)} training: the reference (the model "
                "with its adapters disabled) would move with them; pass --freeze_mm_mlp_adapter "
                "True (and leave --tune_vision_tower off), or train in full"
            )


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The full fine-tuning reference: a frozen copy of the starting weights. Under ZeRO-3 the
    weights are already partitioned when loaded, and a copy would not be: refused."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "full DPO under ZeRO-3: the frozen reference copy is not implemented for partitioned "
            "weights; use ZeRO-2 (scripts/zero2.json), LoRA (its reference is the model with the "
            "adapters disabled) or --reference_free True"
        )
    return copy.deepcopy(model).requires_grad_(False).eval()


def check_data_flags(data_args: DataArguments, args: TrainingArguments) -> None:
    if data_args.validation_split_percentage:
        raise ValueError("--validation_split_percentage is not implemented for DPO")
    if args.packing != "none" or args.pad_max or args.num_length_buckets:
        raise ValueError("DPO pads each batch: leave --packing, --pad_max, --num_length_buckets")


def dpo_run_flags(model_args, data_args, args, dpo_args) -> dict[str, Any]:
    flags = run_flags(model_args, data_args, args)
    flags.update({name: getattr(dpo_args, name) for name in DPO_FLAGS})
    return flags


def train_dpo(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: TrainingArguments,
    dpo_args: DPOArguments,
) -> DPOTrainer | None:
    """Run stage 3 end to end in the locked output folder; None when it had already finished."""
    check_data_flags(data_args, args)
    lock = lock_output_dir(args.output_dir) if args.should_save else None
    try:
        return train_in_locked_folder(model_args, data_args, args, dpo_args)
    finally:
        if lock is not None:
            lock.release()


def train_in_locked_folder(model_args, data_args, args, dpo_args):
    flags = dpo_run_flags(model_args, data_args, args, dpo_args)
    plan = stage_plan_of(model_args, args)
    check_reference(plan, dpo_args)
    start = start_run(args, flags, plan)
    if nothing_left_to_train(start, args, flags):
        return None

    seed_and_checkpointing(args)
    model, tokenizer, processor = load_policy(model_args, data_args, dpo_args, args)
    reference = None
    if not plan.lora and not dpo_args.reference_free:
        reference = frozen_copy(model)
    model, plan = prepare_model(model, model_args, args)
    if args.should_log:
        logger.warning("Stage: DPO, %s\n%s", plan.name, trainable_table(model))
    dataset, collator = build_pair_data(model, tokenizer, processor, model_args, data_args, args)
    check_text_only_steps(model, dataset, processor)
    preemption = PreemptionCallback()
    trainer = DPOTrainer(
        model=model,
        args=args,
        stage_plan=plan,
        run_flags=flags,
        dpo=dpo_args,
        reference_model=reference,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor if processor is not None else tokenizer,
        callbacks=[preemption],
    )
    train_with_preemption(trainer, preemption, start.checkpoint, args.output_dir)
    if data_args.skip_bad_records:
        list_skipped_records(args)
    trainer.save_final(args.output_dir)
    return trainer


def build_pair_data(model, tokenizer, processor, model_args, data_args, args):
    """(dataset, collator) of the pairs: through the model's processor where it has one, else
    through the composed model's tower and this project's templates."""
    skip_log_dir = args.output_dir if data_args.skip_bad_records else None
    version = template_of(model_args, processor)
    if processor is not None:
        return build_processor_preference_data(
            processor, data_args, version, args.model_max_length, skip_log_dir=skip_log_dir
        )
    base = unwrap_base(model)
    check_aspect_of(base, data_args.image_aspect_ratio)
    return build_preference_data(
        tokenizer,
        base.vision_tower.image_processor,
        base.num_image_tokens,
        data_args,
        version,
        args.model_max_length,
        mm_use_im_start_end=getattr(base.config, "mm_use_im_start_end", False),
        skip_log_dir=skip_log_dir,
        anyres=base.anyres,
    )


def check_aspect_of(model: LlavaForCausalLM, image_aspect_ratio: str) -> None:
    """An AnyRes model's images are tiled as it was trained (its config's anyres settings):
    --image_aspect_ratio must name that mode, not another."""
    trained = model.config.image_aspect_ratio
    if model.anyres is not None and image_aspect_ratio != trained:
        raise ValueError(
            f"--image_aspect_ratio {image_aspect_ratio}: the model was trained with {trained} "
            f"(its config's); pass --image_aspect_ratio {trained}"
        )
    if model.anyres is None and is_anyres(image_aspect_ratio):
        raise ValueError(
            f"--image_aspect_ratio {image_aspect_ratio}: the model was trained without anyres "
            "(fixed-size images); pass pad or square"
        )


def main(argv: list[str] | None = None) -> None:
    run_entry(lambda: train_dpo(*parse_dpo_arguments(argv)))


if __name__ == "__main__":
    main()
