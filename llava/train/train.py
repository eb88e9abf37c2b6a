"""Training entry: parse -> build -> stage -> LoRA -> data -> trainer -> save.

Runs as `python -m llava.train.train`, `deepspeed llava/train/train.py` or under torchrun.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import transformers

from llava.constants import IMAGE_END_TOKEN, IMAGE_START_TOKEN
from llava.data.media import is_anyres
from llava.model.builder import build_llava_model, load_tokenizer, open_complete_model
from llava.model.kinds import kind_of
from llava.model.llava import PACKED_SDPA, LlavaForCausalLM, register_packed_attention
from llava.train.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_arguments,
)
from llava.train.checkpoint import load_projector
from llava.train.lora import add_lora, quantization_config
from llava.train.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback
from llava.train.resume import (
    FINISHED,
    PUBLISH,
    RunStart,
    plan_start,
    prepare_output_dir,
    publish_checkpoint,
)
from llava.train.run_folder import check_output_dir_shared, lock_output_dir, run_flags
from llava.train.stages import StagePlan, apply_stage, plan_stage, trainable_table

logger = logging.getLogger("llava.train")


def compute_dtype(args: TrainingArguments) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def build_model(
    model_args: ModelArguments, args: TrainingArguments, data_args: DataArguments | None = None
) -> tuple[torch.nn.Module, Any | None]:
    """(model, its processor or None): compose the LLM and --vision_tower, or open the complete
    VLM --model_name_or_path names. A processor comes with transformers' image-text-to-text
    models, whose data goes through it; composed models read images with their tower's
    (tiled by AnyRes where `data_args` asks for --image_aspect_ratio anyres)."""
    dtype = compute_dtype(args)
    quantization = quantization_config(args.bits, args.double_quant, args.quant_type, dtype)
    language_model_kwargs = {"cache_dir": args.cache_dir}
    if quantization is not None:
        language_model_kwargs["quantization_config"] = quantization
    if args.attn_implementation == PACKED_SDPA:
        register_packed_attention()
    complete = open_complete_model(
        model_args.model_name_or_path,
        model_args.vision_tower,
        dtype,
        attn_implementation=args.attn_implementation,
        **language_model_kwargs,
    )
    if complete is not None:
        if complete.processor is None:
            warn_of_flags_the_model_overrides(complete.model, model_args)
        return finish_model(complete.model, args, quantization), complete.processor
    if model_args.vision_tower is None:
        raise ValueError(
            "--vision_tower is required (an HF CLIP/SigLIP checkpoint or open_clip:...), unless "
            "--model_name_or_path names a complete vision-language model"
        )
    model = build_llava_model(
        model_args.model_name_or_path,
        model_args.vision_tower,
        mm_projector_type=model_args.mm_projector_type,
        mm_vision_select_layer=model_args.mm_vision_select_layer,
        mm_vision_select_feature=model_args.mm_vision_select_feature,
        vision_tower_pretrained=model_args.vision_tower_pretrained,
        torch_dtype=dtype,
        attn_implementation=args.attn_implementation,
        language_model_kwargs=language_model_kwargs,
        **anyres_settings(model_args, data_args),
    )
    return finish_model(model, args, quantization), None


def anyres_settings(model_args: ModelArguments, data_args: DataArguments | None) -> dict:
    """build_llava_model's AnyRes arguments when --image_aspect_ratio asks for anyres."""
    aspect = getattr(data_args, "image_aspect_ratio", None)
    if not is_anyres(aspect):
        if model_args.video_frames:
            raise ValueError(
                "--video_frames: videos train with --image_aspect_ratio anyres or anyres_max_N"
            )
        return {}
    return {
        "image_aspect_ratio": aspect,
        "image_grid_pinpoints": model_args.image_grid_pinpoints,
        "mm_patch_merge_type": model_args.mm_patch_merge_type,
        "video_frames": model_args.video_frames,
        "video_pool_stride": model_args.video_pool_stride,
    }


def finish_model(model: torch.nn.Module, args: TrainingArguments, quantization) -> torch.nn.Module:
    """No KV cache in training; k-bit preparation for QLoRA."""
    for module in model.modules():  # the model's and each sub-model's config
        if isinstance(module, transformers.PreTrainedModel):
            module.config.use_cache = False
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing
        )
    return model


# Flags that describe a composed model; a complete one brings its own values.
MODEL_SHAPE_FLAGS = ("mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature")


def warn_of_flags_the_model_overrides(model: LlavaForCausalLM, model_args: ModelArguments) -> None:
    differences = [
        f"--{name} {getattr(model_args, name)!r} (the model's: {getattr(model.config, name)!r})"
        for name in MODEL_SHAPE_FLAGS
        if getattr(model_args, name) != getattr(model.config, name)
    ]
    if differences:
        logger.warning(
            "%s is a complete model; its own settings stand over %s",
            model_args.model_name_or_path,
            ", ".join(differences),
        )


def add_image_marker_tokens(model: LlavaForCausalLM, tokenizer) -> None:
    """--mm_use_im_start_end: <im_start>/<im_end> become tokens whose embeddings train."""
    added = tokenizer.add_tokens([IMAGE_START_TOKEN, IMAGE_END_TOKEN], special_tokens=True)
    if added:
        model.language_model.resize_token_embeddings(len(tokenizer))
    model.config.mm_use_im_start_end = True


def stage_plan_of(model_args: ModelArguments, args: TrainingArguments) -> StagePlan:
    return plan_stage(
        tune_mm_mlp_adapter=model_args.tune_mm_mlp_adapter,
        lora_enable=args.lora_enable,
        freeze_backbone=model_args.freeze_backbone,
        freeze_mm_mlp_adapter=args.freeze_mm_mlp_adapter,
        tune_vision_tower=model_args.tune_vision_tower,
    )


def prepare_model(
    model: LlavaForCausalLM, model_args: ModelArguments, args: TrainingArguments
) -> tuple[torch.nn.Module, StagePlan]:
    """Load the stage-1 projector, decide what trains, add LoRA."""
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    plan = stage_plan_of(model_args, args)
    apply_stage(model, plan)
    if plan.lora:
        model = add_lora(
            model,
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            bias=args.lora_bias,
            target_modules=args.lora_target_modules,
        )
    return model, plan


def template_of(model_args, processor) -> str:
    """--version, or by default the model's own: the processor's chat template (auto) for a
    model that brings one, LLaVA-1.5's v1 for a composed one."""
    if model_args.version is not None:
        return model_args.version
    return "auto" if processor is not None else "v1"


def build_data(model, tokenizer, model_args, data_args, args, processor=None):
    """(train dataset, validation dataset or None, collator); through `processor` when the
    model brings one, else through the model's vision tower."""
    from llava.data.dataset import build_supervised_data, split_for_validation

    if processor is not None:
        image_inputs = {"processor": processor}
    else:
        image_inputs = {
            "image_processor": model.vision_tower.image_processor,
            "num_image_tokens": model.num_image_tokens,
            "anyres": model.anyres,
        }
    cache = data_args.vision_feature_cache
    if cache:
        dataset, collator = cached_data(model, tokenizer, model_args, data_args, args, processor)
    else:
        dataset, collator = build_supervised_data(
            tokenizer=tokenizer,
            data_args=data_args,
            version=template_of(model_args, processor),
            model_max_length=args.model_max_length,
            mm_use_im_start_end=model_args.mm_use_im_start_end,
            skip_log_dir=args.output_dir if data_args.skip_bad_records else None,
            **image_inputs,
        )
    if processor is None:
        collator.static_shapes = static_shapes(dataset, model, args)
    if args.packing != "none":
        from llava.data.packing import PackingCollator

        collator = PackingCollator(collator.pad_token_id, flatten=args.packing == "flat")
    if cache:
        from llava.data.feature_cache import FeatureCollator

        # batches image_features where pixels would go
        collator = FeatureCollator(collator, tuple(dataset.cache.key["feature_shape"]))
    if not data_args.validation_split_percentage:
        return dataset, None, collator
    train_dataset, validation_dataset = split_for_validation(
        dataset, data_args.validation_split_percentage, args.data_seed or args.seed
    )
    return train_dataset, validation_dataset, collator


def cached_data(model, tokenizer, model_args, data_args, args, processor):
    """(dataset, collator) of --vision_feature_cache, checked against the model's tower."""
    from llava.data.feature_cache import build_cached_data, refuse_unservable

    refuse_unservable(
        model_args.tune_vision_tower, data_args.image_aspect_ratio, processor is not None
    )
    return build_cached_data(
        tokenizer,
        template_of(model_args, processor),
        args.model_max_length,
        data_args,
        model.vision_tower,
        model.num_image_tokens,
        mm_use_im_start_end=model_args.mm_use_im_start_end,
        skip_log_dir=args.output_dir if data_args.skip_bad_records else None,
    )


def static_shapes(dataset, model: LlavaForCausalLM, args: TrainingArguments):
    """The fixed batch shapes --pad_max / --num_length_buckets ask for (None: dynamic)."""
    from llava.data.collator import StaticShapes, bucket_lengths

    if args.pad_max:
        lengths = (args.model_max_length,)
    elif args.num_length_buckets:
        lengths = bucket_lengths(args.model_max_length, args.num_length_buckets)
    else:
        return None
    if model.anyres is not None:
        raise ValueError(
            "--pad_max / --num_length_buckets: static shapes are not implemented with "
            "--image_aspect_ratio anyres (a batch's tiles vary with its images' sizes); "
            "pass --num_length_buckets 0"
        )
    batch_size = max(args.per_device_train_batch_size, args.per_device_eval_batch_size)
    height, width = model.vision_tower.image_size
    image_shape = (3, height, width)
    if getattr(dataset, "cache", None) is not None:  # cached features (P, C) fill the slots
        image_shape = tuple(dataset.cache.key["feature_shape"])
    return StaticShapes(
        lengths=lengths,
        image_slots=batch_size * max(1, dataset.max_images_per_sample),
        image_shape=image_shape,
    )


def build_trainer(model, args: TrainingArguments, plan: StagePlan, **trainer_kwargs):
    """LlavaTrainer, or on Gaudi arguments the same mixin over optimum-habana's GaudiTrainer."""
    from llava.train.gaudi import gaudi_config, gaudi_trainer_class, is_gaudi_arguments

    if is_gaudi_arguments(args):
        trainer_class = gaudi_trainer_class()
        trainer_kwargs["gaudi_config"] = gaudi_config(args)
    else:
        from llava.train.trainer import LlavaTrainer as trainer_class
    return trainer_class(model=model, args=args, stage_plan=plan, **trainer_kwargs)


class Preempted(RuntimeError):
    """The run stopped on a preemption signal after writing a checkpoint."""


def start_run(args: TrainingArguments, flags: dict, plan: StagePlan) -> RunStart:
    """Decide how the run starts (every rank, from the same files) and let the writing process
    clear the folder's leftovers; the decision is logged."""
    if not args.save_on_each_node:  # every rank must read the files rank 0 locked and writes
        barrier()
        check_output_dir_shared(args.output_dir)
    start = plan_start(args, flags, plan)
    if args.should_save:
        removed = prepare_output_dir(start, args.output_dir)
        if removed:
            logger.warning("Removed from %s: %s", args.output_dir, ", ".join(removed))
    if args.should_log:
        logger.warning("Run: %s", start.reason)
    barrier()
    return start


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def train(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments):
    """Run one stage end to end; returns the trainer (its model, state and logs), or None when
    the output folder already holds this run's finished result.

    The writing process holds the output folder's lock throughout (llava/train/run_folder.py).
    """
    lock = lock_output_dir(args.output_dir) if args.should_save else None
    try:
        return train_in_locked_folder(model_args, data_args, args)
    finally:
        if lock is not None:
            lock.release()


def nothing_left_to_train(start: Any, args: TrainingArguments, flags: dict[str, Any]) -> bool:
    """Whether the run start_run found had already finished, or only needed its last
    checkpoint published (done here, by the saving rank, the others waiting)."""
    if start.action == FINISHED:
        return True
    if start.action == PUBLISH:
        if args.should_save:
            publish_checkpoint(start, args.output_dir, flags)
        barrier()
        return True
    return False


def seed_and_checkpointing(args: TrainingArguments) -> None:
    """The seed every rank builds from; non-reentrant gradient checkpointing by default."""
    transformers.set_seed(args.seed)
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}


def check_text_only_steps(model: torch.nn.Module, dataset: Any, processor: Any) -> None:
    """An image-text-to-text model's kind checks that its text-only steps can run (ZeRO-3)."""
    if processor is not None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        has_text_only = "text" in dataset.modalities
        kind_of(model).check_text_only_steps(model, has_text_only, is_deepspeed_zero3_enabled())


def train_in_locked_folder(model_args, data_args, args):
    flags = run_flags(model_args, data_args, args)
    plan = stage_plan_of(model_args, args)
    start = start_run(args, flags, plan)
    if nothing_left_to_train(start, args, flags):
        return None

    seed_and_checkpointing(args)  # every rank builds the same fresh projector
    model, processor = build_model(model_args, args, data_args)
    if processor is None:
        tokenizer = load_tokenizer(model_args.model_name_or_path, args.model_max_length)
        if model_args.mm_use_im_start_end:
            add_image_marker_tokens(model, tokenizer)
        model.config.image_aspect_ratio = data_args.image_aspect_ratio
    else:
        check_flags_for_processor_model(model_args, data_args, args)
        tokenizer = processor_tokenizer(processor, args.model_max_length)
    model, plan = prepare_model(model, model_args, args)
    if args.should_log:
        logger.warning("Stage: %s\n%s", plan.name, trainable_table(model))

    train_dataset, validation_dataset, collator = build_data(
        model, tokenizer, model_args, data_args, args, processor
    )
    check_text_only_steps(model, train_dataset, processor)
    preemption = PreemptionCallback()
    trainer = build_trainer(
        model,
        args,
        plan,
        run_flags=flags,
        train_dataset=train_dataset,
        eval_dataset=validation_dataset,
        data_collator=collator,
        processing_class=processor if processor is not None else tokenizer,
        callbacks=[preemption],
    )
    train_with_preemption(trainer, preemption, start.checkpoint, args.output_dir)
    if validation_dataset is not None and args.eval_strategy == "no":
        trainer.evaluate()
    if data_args.skip_bad_records:
        list_skipped_records(args)
    trainer.save_final(args.output_dir)
    return trainer


def processor_tokenizer(processor: Any, model_max_length: int) -> Any:
    """The tokenizer inside a model's processor, set up as load_tokenizer sets one up."""
    tokenizer = processor.tokenizer
    tokenizer.model_max_length = model_max_length
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def check_flags_for_processor_model(model_args, data_args, args) -> None:
    """Flags that describe a composed model's data or shapes have no meaning for a model that
    brings its own processor and chat template: an error names each, or a warning where the
    model's own setting simply stands (the scripts pass LLaVA-1.5's)."""
    source = model_args.model_name_or_path
    if model_args.version not in (None, "auto"):
        raise ValueError(
            f"--version {model_args.version}: {source} renders conversations with its own chat "
            "template; pass --version auto (or leave --version out)"
        )
    if model_args.mm_use_im_start_end:
        raise ValueError(
            f"--mm_use_im_start_end: {source}'s processor writes its own image markers"
        )
    if args.packing != "none":
        raise ValueError(
            f"--packing {args.packing}: not implemented for {source}'s model class (its "
            "attention and positions, M-RoPE for Qwen-VL, are not tested equal when packed); "
            "train unpacked"
        )
    if args.pad_max or args.num_length_buckets:
        raise ValueError(
            "--pad_max / --num_length_buckets: static shapes are not implemented for "
            f"{source}'s processor inputs"
        )
    defaults = ModelArguments(model_name_or_path=source)
    ignored = [
        f"--{name} {getattr(model_args, name)}"
        for name in MODEL_SHAPE_FLAGS
        if getattr(model_args, name) != getattr(defaults, name)
    ]
    if ignored and args.should_log:
        logger.warning("Ignored, as %s brings its own connector: %s", source, ", ".join(ignored))
    if data_args.image_aspect_ratio != "square" and args.should_log:
        logger.warning(
            "--image_aspect_ratio %s is ignored: %s's processor sizes images itself",
            data_args.image_aspect_ratio,
            source,
        )


def list_skipped_records(args: TrainingArguments) -> None:
    """Merge every process's skipped records into output_dir/skipped_records.jsonl (global rank
    0 only: with --save_on_each_node several processes save) and log the total."""
    from llava.data.skipped import collect_skipped_records, skipped_records_line

    barrier()  # every rank and loader worker has stopped reading
    if args.process_index == 0:
        total = collect_skipped_records(args.output_dir)
        logger.warning(skipped_records_line(total, args.output_dir))
    barrier()


def main(argv: list[str] | None = None) -> None:
    run_entry(lambda: train(*parse_arguments(argv)))


def train_with_preemption(
    trainer: Any, preemption: PreemptionCallback, checkpoint: str | None, output_dir: str
) -> None:
    """trainer.train() with the SIGTERM / SIGUSR1 handler installed; a preempted run (its
    checkpoint written) raises Preempted."""
    preemption.install()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        preemption.uninstall()
    if preemption.preempted_at is not None:
        raise Preempted(preemption.resume_message(output_dir))


def run_entry(run: Callable[[], Any]) -> None:
    """A training entry's process: logging set up, `run()`, a preemption's exit code, and the
    process group left in step."""
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stdout)
    exit_code = 0
    try:
        run()
    except Preempted as preempted:
        logger.warning("%s", preempted)
        exit_code = PREEMPTED_EXIT_CODE
    # Leave the process group in step: a rank exiting while another still holds the
    # communication threads can abort the launcher ("terminate called without an active
    # exception") after a run that succeeded.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    main()
