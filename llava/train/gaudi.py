"""Intel Gaudi through optimum-habana: its arguments and trainer, with LLaVA's fields and mixin.

Nothing here is imported by `llava` at import time. optimum-habana is imported inside these
functions, after the command line asked for Gaudi (`--use_habana`), so its adapted
transformers classes are in place before any model is built. Without the Habana stack,
`import optimum.habana` raises IndexError (it parses `pip list` for habana-torch-plugin); that
is turned into an error that says what is missing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from transformers import Trainer

from llava.compat import restored_training_fields
from llava.train.arguments import LlavaTrainingFields
from llava.train.trainer import LlavaTrainerMixin

# Static shapes on HPU: lazy mode compiles one graph per input shape.
GAUDI_LENGTH_BUCKETS = 8


def import_optimum_habana() -> ModuleType:
    """`optimum.habana`, or an error naming what is missing."""
    try:
        import optimum.habana
    except ImportError as error:
        raise RuntimeError(
            "--use_habana needs optimum-habana: pip install -e '.[habana]' (inside the Intel "
            "Gaudi container, with the Habana DeepSpeed fork for --deepspeed)"
        ) from error
    except IndexError as error:  # its version check found no habana-torch-plugin
        raise RuntimeError(
            "optimum-habana is installed but the Habana software stack is not (no "
            "habana-torch-plugin in `pip list`): --use_habana runs only on a Gaudi machine"
        ) from error
    return optimum.habana


@functools.cache
def gaudi_training_arguments_class() -> type:
    """LLaVA's training fields on optimum-habana's GaudiTrainingArguments."""
    base = import_optimum_habana().GaudiTrainingArguments

    @dataclass
    class GaudiLlavaTrainingArguments(LlavaTrainingFields, restored_training_fields(base), base):
        """Training arguments for Gaudi (GaudiTrainer): bf16 only, static shapes by default."""

        num_length_buckets: int = field(
            default=GAUDI_LENGTH_BUCKETS,
            metadata={"help": "Batches padded to one of this many lengths (static shapes)."},
        )
        dataloader_drop_last: bool = field(
            default=True, metadata={"help": "A short last batch would be one more graph."}
        )

    return GaudiLlavaTrainingArguments


def is_gaudi_arguments(args: Any) -> bool:
    """Whether `args` came from optimum-habana's arguments (without importing it otherwise)."""
    return any(cls.__name__ == "GaudiTrainingArguments" for cls in type(args).__mro__)


@functools.cache
def gaudi_trainer_class() -> type:
    """LlavaTrainerMixin over optimum-habana's GaudiTrainer."""
    habana = import_optimum_habana()

    class LlavaGaudiTrainer(LlavaTrainerMixin, habana.GaudiTrainer):
        """The trainer for Gaudi: LLaVA's sampler, optimizer groups and saving on GaudiTrainer."""

        def get_optimizer_cls_and_kwargs(self, args, model=None):
            """Habana's fused AdamW when the Gaudi config asks for it, on HPU."""
            if self.gaudi_config.use_fused_adam and args.use_habana:
                from habana_frameworks.torch.hpex.optimizers import FusedAdamW

                betas = (args.adam_beta1, args.adam_beta2)
                return FusedAdamW, {
                    "lr": args.learning_rate,
                    "betas": betas,
                    "eps": args.adam_epsilon,
                }
            return Trainer.get_optimizer_cls_and_kwargs(args, model)

        def log(self, logs, start_time=None, end_time=None):
            """GaudiTrainer adds HPU memory statistics, which exist only on HPU."""
            if self.args.use_habana:
                super().log(logs, start_time, end_time)
            else:
                self.add_throughput_metrics(logs)
                Trainer.log(self, logs, start_time)

    return LlavaGaudiTrainer


def gaudi_config(args: Any) -> Any:
    """The GaudiConfig of `--gaudi_config_name` (a file or hub name), else the defaults."""
    habana = import_optimum_habana()
    if args.gaudi_config_name:
        return habana.GaudiConfig.from_pretrained(args.gaudi_config_name)
    return habana.GaudiConfig()
