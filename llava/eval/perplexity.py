"""Perplexity of a model on a data file: exp of the mean loss over every supervised token.

    python -m llava.eval.perplexity --model-path P [--model-base B] --data_path D \
        [--image_folder F] --version v1 [--batch-size 8] [--model_max_length 2048]

The data file is read by the training pipeline (any format it reads, the same template,
truncation and drops), so the number is comparable with the training loss. The mean is over
all supervised tokens of the whole set, not a mean of per-batch means. A transformers
image-text-to-text model's data goes through its processor and chat template (--version auto,
the default for it), and its loss is its kind's, as in training.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from llava.data.collator import SupervisedCollator, pad_token_id_of
from llava.data.dataset import SupervisedDataset, load_supervised_dataset
from llava.data.processor_collator import ProcessorCollator, batching_rules
from llava.data.processor_media import load_processor_dataset
from llava.inference import template_name
from llava.model.builder import LoadedModel, add_loading_flags, load_from_flags
from llava.model.kinds import kind_of
from llava.train.evaluation import summed_loss


@dataclass(frozen=True)
class Perplexity:
    """The score and what it was computed from."""

    perplexity: float
    mean_loss: float  # nats per supervised token
    num_tokens: int  # supervised tokens scored
    num_samples: int


def with_kind_loss(model: nn.Module) -> Callable[..., Any]:
    """The model as summed_loss calls it (`model(**batch, num_items_in_batch=1).loss`, the sum).

    A kind whose loss is taken outside the forward (the image-text-to-text kind: logits only at
    supervised positions, float32 cross-entropy) gets it as the trainer does; others compute
    it in their forward."""
    kind = kind_of(model)
    if kind.loss_function is None:
        return model

    def forward(num_items_in_batch: int | None = None, **batch: torch.Tensor) -> Any:
        inputs = kind.loss_inputs(model, batch)
        labels = inputs.pop("labels")
        return SimpleNamespace(loss=kind.loss_function(model(**inputs), labels, num_items_in_batch))

    return forward


def score_perplexity(
    model: nn.Module,
    dataset: SupervisedDataset,
    pad_token_id: int,
    batch_size: int = 8,
    collator: Callable[[list[dict]], dict[str, torch.Tensor]] | None = None,
) -> Perplexity:
    """Summed token losses over the set divided by its supervised-token count, then exp.

    `collator`: the dataset's own (a processor's, say); default SupervisedCollator."""
    if len(dataset) == 0:
        raise ValueError(f"no sample to score: {dataset.summary.line()}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {batch_size}")
    model.eval()
    device = next(model.parameters()).device

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            key: value.to(device, model.dtype) if value.is_floating_point() else value.to(device)
            for key, value in batch.items()
        }

    collator = collator or SupervisedCollator(pad_token_id)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    scored = with_kind_loss(model)
    total_loss, num_tokens = summed_loss(scored, tqdm(loader, desc="scoring"), to_device)
    mean_loss = total_loss.item() / int(num_tokens)
    return Perplexity(math.exp(mean_loss), mean_loss, num_tokens, len(dataset))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loading_flags(parser)
    parser.add_argument("--data_path", required=True, help="any format the training data reads")
    parser.add_argument("--image_folder", default=None)
    parser.add_argument(
        "--dataset_text_field", default=None, help="for datasets with other columns"
    )
    parser.add_argument("--dataset_image_field", default=None)
    parser.add_argument(
        "--version",
        default=None,
        help="the chat template trained with; default: v1, or the model's own (auto) where "
        "it has a processor",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--model_max_length", type=int, default=None, help="default: the model's context length"
    )
    return parser.parse_args(argv)


def supervised_data(
    loaded: LoadedModel, args: argparse.Namespace
) -> tuple[SupervisedDataset, Callable[[list[dict]], dict[str, torch.Tensor]]]:
    """(dataset, collator) as training builds them for the loaded model."""
    version = template_name(loaded, args.version, "--version")
    max_length = args.model_max_length or loaded.context_length
    pad_token_id = pad_token_id_of(loaded.tokenizer)
    if loaded.processor is not None:
        dataset = load_processor_dataset(
            args.data_path,
            loaded.processor,
            version,
            max_length,
            image_folder=args.image_folder,
            dataset_text_field=args.dataset_text_field,
            dataset_image_field=args.dataset_image_field,
        )
        return dataset, ProcessorCollator(pad_token_id, batching_rules(dataset.media))
    config = loaded.model.config
    dataset = load_supervised_dataset(
        args.data_path,
        loaded.tokenizer,
        version,
        max_length,
        image_processor=loaded.image_processor,
        num_image_tokens=loaded.model.num_image_tokens,
        image_folder=args.image_folder,
        dataset_text_field=args.dataset_text_field,
        dataset_image_field=args.dataset_image_field,
        image_aspect_ratio=getattr(config, "image_aspect_ratio", "square") or "square",
        mm_use_im_start_end=bool(config.mm_use_im_start_end),
        anyres=getattr(loaded.model, "anyres", None),
    )
    return dataset, SupervisedCollator(pad_token_id)


def main(argv: list[str] | None = None) -> Perplexity:
    args = parse_arguments(argv)
    loaded = load_from_flags(args)
    dataset, collator = supervised_data(loaded, args)
    result = score_perplexity(
        loaded.model, dataset, pad_token_id_of(loaded.tokenizer), args.batch_size, collator
    )
    print(dataset.summary.line())
    print(
        f"perplexity {result.perplexity:.4f} (mean loss {result.mean_loss:.4f} over "
        f"{result.num_tokens} supervised tokens in {result.num_samples} samples)"
    )
    return result


if __name__ == "__main__":
    main()
