"""A mixin over HF Trainer (and GaudiTrainer): grouped sampler, projector lr, fused AdamW,
throughput logging, stage-aware saving, committed checkpoints and a staged final save."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from llava.compat import make_tokenizer_config_portable, save_processor
from llava.data.packing import without_sample_lengths
from llava.model.kinds import CONNECTOR, kind_of, parts_by_role, unwrap_base
from llava.model.weights import NON_LORA_TRAINABLES_FILE, PROJECTOR_FILE
from llava.train.checkpoint import (
    add_trained_parts_to_adapter,
    load_non_lora_trainables,
    load_projector,
    save_non_lora_trainables,
    save_projector,
)
from llava.train.commit import commit_checkpoint, publish, rotate, staging_folder
from llava.train.evaluation import PaddedShard, loss_metrics, summed_loss
from llava.train.run_folder import write_run_complete, write_run_flags
from llava.train.stages import ADAPTERS, PROJECTOR, StagePlan, record_stage_plan
from llava.train.throughput import ThroughputCallback


class LlavaTrainerMixin:
    """Behaviour shared by the GPU/CPU trainer and the Gaudi trainer.

    Takes `stage_plan` (a StagePlan: what checkpoints hold, what the FLOP count assumes; it is
    recorded in every saved config.json) and `run_flags` (recorded in every checkpoint, see
    llava/train/run_folder.py) besides the trainer's own arguments; the train dataset exposes
    `lengths` and `modalities` for the grouped samplers.
    """

    stage_plan: StagePlan

    def __init__(
        self, *args: Any, stage_plan: StagePlan, run_flags: dict | None = None, **kwargs: Any
    ):
        self.stage_plan = stage_plan
        self.run_flags = run_flags or {}
        model = kwargs.get("model", args[0] if args else None)
        self.model_kind = kind_of(model)
        if self.model_kind.loss_function is not None:  # the loss at supervised positions
            kwargs.setdefault("compute_loss_func", self.model_kind.loss_function)
        super().__init__(*args, **kwargs)
        record_stage_plan(unwrap_base(self.model).config, stage_plan)
        # made once: which parts train does not change within a run
        self.image_path_inputs = self.model_kind.image_path_inputs(
            self.model, self.processing_class
        )
        self.model.register_load_state_dict_post_hook(forgive_missing_frozen_weights)
        self.add_throughput_callback()

    # -- sampling ---------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        from llava.data.sampler import build_train_sampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = build_train_sampler(
            dataset,
            per_device_batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            group_by_modality_length=self.args.group_by_modality_length,
            group_by_length=self.args.group_by_length,
            seed=self.args.seed,
        )
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    # -- optimizer ----------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """AdamW groups: no weight decay on biases and norms; the projector at --mm_projector_lr.

        `model`: the prepared model 5.x passes when it delays the optimizer (FSDP).
        """
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(model))
        connector = {id(p) for p in parts_by_role(self.model)[CONNECTOR].parameters()}
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            is_projector = self.args.mm_projector_lr is not None and id(parameter) in connector
            groups.setdefault((name in decay_names, is_projector), []).append(parameter)
        param_groups = []
        for (decay, is_projector), parameters in groups.items():
            group: dict[str, Any] = {
                "params": parameters,
                "weight_decay": self.args.weight_decay if decay else 0.0,
            }
            if is_projector:
                group["lr"] = self.args.mm_projector_lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        if optimizer_cls is torch.optim.AdamW and self.fused_adamw_applies(param_groups):
            optimizer_kwargs = {**optimizer_kwargs, "fused": True}
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def fused_adamw_applies(self, param_groups: list[dict[str, Any]]) -> bool:
        """torch's fused AdamW (one kernel per step instead of a loop over tensors) runs on CUDA
        and CPU; DeepSpeed steps its own flattened copies, so it is left alone there."""
        parameters = [p for group in param_groups for p in group["params"]]
        return (
            not self.is_deepspeed_enabled
            and bool(parameters)
            and all(p.device.type in ("cuda", "cpu") for p in parameters)
            and all(p.dtype.is_floating_point for p in parameters)
        )

    # -- throughput ---------------------------------------------------------------------------
    def add_throughput_callback(self) -> None:
        """Log samples/s, tokens/s, padding, TFLOP/s and MFU at each logging step."""
        if self.throughput_callback() is None:
            self.add_callback(ThroughputCallback(self.stage_plan))

    def throughput_callback(self) -> ThroughputCallback | None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ThroughputCallback):
                return callback
        return None

    def training_step(self, model, inputs, *args, **kwargs):
        """Record the batch's statistics (no device sync) and train on the model's inputs."""
        callback = self.throughput_callback()
        if callback is not None and callback.meter is not None:
            callback.meter.record(inputs)
        return super().training_step(model, without_sample_lengths(inputs), *args, **kwargs)

    def add_throughput_metrics(self, logs: dict[str, float]) -> None:
        """Training logs (those with a loss) gain the rates since the previous one."""
        callback = self.throughput_callback()
        if "loss" not in logs or callback is None or callback.meter is None:
            return
        logs.update(callback.meter.rates())

    def raise_deferred_image_errors(self, logs: dict[str, float]) -> None:
        """At each training log (one with a loss), where the step waits for the device anyway,
        and at the end-of-training log (train_loss, after the last step), the model's deferred
        image-token check raises (see LlavaForCausalLM.check_image_tokens)."""
        raise_deferred = getattr(unwrap_base(self.model), "raise_deferred_image_errors", None)
        if ("loss" in logs or "train_loss" in logs) and raise_deferred is not None:
            raise_deferred()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self.add_throughput_metrics(logs)
        self.raise_deferred_image_errors(logs)
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        """The model kind decides the forward's inputs (which logits the loss needs)."""
        inputs = self.model_kind.loss_inputs(self.model, inputs)  # self.model: not an engine
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if not model.training:
            return result
        loss, outputs = result if isinstance(result, tuple) else (result, None)
        loss = self.model_kind.with_image_path(self.model, inputs, loss, self.image_path_inputs)
        return loss if outputs is None else (loss, outputs)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Validation loss as the mean over every supervised token, and its perplexity."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        shard = PaddedShard(dataset, self.args.process_index, self.args.world_size)
        loader = DataLoader(
            shard,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        self.model.eval()
        total, count = summed_loss(self.model, loader, self.prepare_model_inputs)
        totals = torch.stack([total.double(), count.double()]).to(self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(totals)
        metrics = loss_metrics(totals[0].item(), int(totals[1].item()), metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def prepare_model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self._prepare_inputs(without_sample_lengths(batch))

    # -- saving -------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Stage 1 writes mm_projector.bin + config; LoRA adds non_lora_trainables.bin + config."""
        output_dir = output_dir or self.args.output_dir
        base = unwrap_base(self.model)
        write = self.args.should_save
        if self.stage_plan.checkpoint == PROJECTOR:
            save_projector(self.model, output_dir, write)
            if write:
                base.config.save_pretrained(output_dir)
            return
        super().save_model(output_dir, _internal_call=_internal_call)
        if write and self.processing_class is not None:  # the trainer saved it beside the model
            save_processing_class(self.processing_class, output_dir)
        if self.stage_plan.checkpoint == ADAPTERS:
            save_non_lora_trainables(self.model, self.stage_plan, output_dir, write)
            if write:
                base.config.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under DeepSpeed, frozen weights stay out of the engine's checkpoint.

        They are the base checkpoints' own and are rebuilt from them on resume: a stage-1
        checkpoint of a 7B model holds the projector and its optimizer state, not 14 GB of
        frozen language model.
        """
        if not self.is_deepspeed_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        from accelerate.utils import DeepSpeedSchedulerWrapper
        from transformers.trainer import SCHEDULER_NAME

        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        # The engine saves its own scheduler; the trainer's (the usual case) is saved here.
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N on every rank, then commit it, then rotate (llava/train/commit.py).

        transformers' own rotation would run before every rank finished and before the commit,
        so it is held back (a limit of None) while transformers saves.
        """
        save_total_limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            write_run_flags(folder, self.run_flags)
        self.accelerator.wait_for_everyone()  # every rank has written its part
        # Every rank's own files must be in the folder (with --save_on_each_node: not checked).
        if self.args.should_save:
            commit_checkpoint(folder, 1 if self.args.save_on_each_node else self.args.world_size)
            rotate(run_dir, save_total_limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def save_final(self, output_dir: str) -> None:
        """The run's result at the top of output_dir: the model files (as save_model writes them)
        and trainer_state.json are written into a staging folder, moved into place, and the run
        is marked finished (run_complete.json) last. Every rank calls it."""
        staging = staging_folder(output_dir)
        self.save_model(staging)
        if self.stage_plan.checkpoint == ADAPTERS and self.model_kind.adapter_holds_trained_parts:
            add_trained_parts_to_adapter(
                self.model, self.stage_plan, staging, self.args.should_save
            )
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging, "trainer_state.json"))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staging, output_dir)
            write_run_complete(output_dir, self.state.global_step, self.run_flags)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume without DeepSpeed (with it, the engine's own checkpoint holds everything).

        A stage-1 checkpoint holds only the projector; a LoRA one the adapters, with the
        projector in non_lora_trainables.bin.
        """
        target = model if model is not None else self.model
        if self.stage_plan.checkpoint == PROJECTOR:
            load_projector(target, os.path.join(resume_from_checkpoint, PROJECTOR_FILE))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.stage_plan.checkpoint == ADAPTERS:
            path = os.path.join(resume_from_checkpoint, NON_LORA_TRAINABLES_FILE)
            load_non_lora_trainables(target, path)


def save_processing_class(processing_class: Any, folder: str) -> None:
    """The tokenizer, or a model's whole processor, in the layout both transformers lines read."""
    if hasattr(processing_class, "image_processor"):
        save_processor(processing_class, folder)
    else:
        make_tokenizer_config_portable(processing_class, folder)


def forgive_missing_frozen_weights(model: torch.nn.Module, incompatible_keys) -> None:
    """Load-state-dict hook: a checkpoint may leave out frozen weights (see above), even when
    the loader is strict; every trainable weight must still be there."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = [key for key in incompatible_keys.missing_keys if key not in frozen]
    incompatible_keys.missing_keys[:] = missing


class LlavaTrainer(LlavaTrainerMixin, Trainer):
    """The trainer for GPU and CPU runs."""
