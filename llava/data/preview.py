"""Show what the model will be trained on, with the supervised spans marked.

    python -m llava.data.preview --data_path data.json --model_name_or_path lmsys/vicuna-7b-v1.5 \
        --version v1 --image_folder images --vision_tower openai/clip-vit-large-patch14-336

Supervised text is shown between ⟦ and ⟧, each image as <image xN>. `--json` prints one JSON
object per sample (input_ids, labels, ...) on stdout; the data summary line goes to stderr.
`--num_image_tokens N` stands in for a vision tower (a CLIP processor of `--image_size`).
A transformers image-text-to-text checkpoint (Qwen2-VL, Idefics3, Gemma 3, ...) is shown through
its own processor and chat template (`--version auto`, its default), from its configs alone:

    python -m llava.data.preview --data_path data.json --model_name_or_path HuggingFaceTB/SmolVLM-256M-Instruct \
        --image_folder images
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from llava.constants import IGNORE_INDEX, IMAGE_END_TOKEN, IMAGE_PLACEHOLDER_ID, IMAGE_START_TOKEN
from llava.conversation import TEMPLATES
from llava.data.dataset import SupervisedDataset, load_supervised_dataset
from llava.data.images import DEFAULT_MAX_IMAGE_PIXELS

SUPERVISED_OPEN, SUPERVISED_CLOSE = "⟦", "⟧"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument(
        "--model_name_or_path",
        required=True,
        help="Where the tokenizer is; a complete VLM folder (llava-hf) brings its image settings.",
    )
    parser.add_argument(
        "--version",
        default=None,
        choices=list(TEMPLATES),
        help="Chat template, as in training (default: auto for a model with its own processor, "
        "else v1).",
    )
    parser.add_argument("--image_folder", default=None)
    parser.add_argument("--vision_tower", default=None)
    parser.add_argument("--mm_vision_select_feature", default="patch")
    parser.add_argument(
        "--mm_projector_type",
        default="mlp2x_gelu",
        help="With --vision_tower: a token-reducing projector changes the image tokens.",
    )
    parser.add_argument("--num_image_tokens", type=int, default=None, help="Instead of a tower.")
    parser.add_argument("--image_size", type=int, default=224, help="With --num_image_tokens.")
    parser.add_argument(
        "--image_aspect_ratio",
        default="square",
        help="square, pad, or anyres / anyres_max_N (with --vision_tower and "
        "--image_grid_pinpoints: each image's tokens by its size)",
    )
    parser.add_argument("--image_grid_pinpoints", default=None, help="With anyres.")
    parser.add_argument(
        "--mm_patch_merge_type", default="spatial_unpad", choices=["spatial_unpad", "flat"]
    )
    parser.add_argument("--video_frames", type=int, default=None, help="With anyres: videos.")
    parser.add_argument("--video_pool_stride", type=int, default=2, help="With --video_frames.")
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--dataset_text_field", default=None)
    parser.add_argument("--dataset_image_field", default=None)
    parser.add_argument("--skip_bad_records", action="store_true")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument("--mm_use_im_start_end", action="store_true")
    parser.add_argument("--num", type=int, default=3, help="How many samples to show.")
    parser.add_argument("--json", action="store_true", help="One JSON object per sample.")
    return parser.parse_args(argv)


def image_processor_and_tokens(args: argparse.Namespace) -> tuple[Any, int]:
    """(processor, num_image_tokens) from --vision_tower, from the complete VLM that
    --model_name_or_path names (llava-hf), or --num_image_tokens alone."""
    if not args.vision_tower and not args.num_image_tokens:
        from llava.model.builder import describe_complete_model

        described = describe_complete_model(args.model_name_or_path)
        if described is not None:
            return described
    if args.vision_tower:
        from llava.model.builder import load_vision_tower_processor

        processor, num_tokens = load_vision_tower_processor(
            args.vision_tower, args.mm_vision_select_feature, args.mm_projector_type
        )
        return processor, args.num_image_tokens or num_tokens
    if args.num_image_tokens:
        from transformers import CLIPImageProcessor

        size = args.image_size
        processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        return processor, args.num_image_tokens
    return None, 0


def load_tokenizer(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.mm_use_im_start_end:
        tokenizer.add_tokens([IMAGE_START_TOKEN, IMAGE_END_TOKEN], special_tokens=True)
    return tokenizer


def runs(
    input_ids: list[int], labels: list[int], image_ids: frozenset[int] = frozenset()
) -> list[tuple[str, list[int]]]:
    """Consecutive (kind, ids) runs; kind is image, supervised or prompt. `image_ids`: the ids
    that stand for image features (the placeholder, or a processor's image token)."""
    image_ids = image_ids or frozenset({IMAGE_PLACEHOLDER_ID})
    result: list[tuple[str, list[int]]] = []
    for token, label in zip(input_ids, labels):
        kind = "image" if token in image_ids else "prompt"
        kind = "supervised" if label != IGNORE_INDEX else kind
        if result and result[-1][0] == kind:
            result[-1][1].append(token)
        else:
            result.append((kind, [token]))
    return result


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render_marked(
    tokenizer: Any, input_ids: list[int], labels: list[int], image_ids: frozenset[int] = frozenset()
) -> str:
    """The sample as text: supervised runs in ⟦ ⟧, images as <image xN>.

    Text between two images is decoded as a whole and cut at the run boundaries, so spaces
    that sentencepiece keeps inside a token show where they are.
    """
    pieces, text_runs = [], []

    def flush() -> None:
        ids: list[int] = []
        previous = ""
        for kind, run in text_runs:
            ids += run
            text = decode(tokenizer, ids)
            piece = text[len(previous) :] if text.startswith(previous) else decode(tokenizer, run)
            previous = text
            marked = SUPERVISED_OPEN + piece + SUPERVISED_CLOSE if kind == "supervised" else piece
            pieces.append(marked)
        text_runs.clear()

    for kind, run in runs(input_ids, labels, image_ids):
        if kind == "image":
            flush()
            pieces.append(f"<image x{len(run)}>")
        else:
            text_runs.append((kind, run))
    flush()
    return "".join(pieces)


def describe(
    dataset: SupervisedDataset, tokenizer: Any, i: int, image_ids: frozenset[int] = frozenset()
) -> dict[str, Any]:
    record, num_images = dataset.samples[i]
    sample = dataset[i]
    input_ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    pixels = sample.get("pixel_values")
    return {
        "sample": i,
        "source": record.source,
        "record_index": record.index,
        "id": record.id,
        "modality": dataset.modalities[i],
        "length": len(input_ids),
        "num_images": num_images,
        "pixel_values_shape": None if pixels is None else list(pixels.shape),
        "num_supervised": sum(label != IGNORE_INDEX for label in labels),
        "input_ids": input_ids,
        "labels": labels,
        "text": render_marked(tokenizer, input_ids, labels, image_ids),
    }


def show(info: dict[str, Any]) -> str:
    header = (
        f"=== sample {info['sample']}: {info['source']} record {info['record_index']}"
        f" (id {info['id']}) | {info['modality']} | {info['length']} tokens, "
        f"{info['num_images']} images {info['pixel_values_shape'] or ''}, "
        f"{info['num_supervised']} supervised"
    )
    return header + "\n" + info["text"] + "\n"


def processor_image_ids(processor: Any) -> frozenset[int]:
    """The ids a processor writes for image features (its image token; Idefics3's and
    Gemma 3's markers around them stay visible as text)."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return frozenset() if token_id is None else frozenset({token_id})


def processor_dataset(args: argparse.Namespace) -> tuple[SupervisedDataset, Any, Any] | None:
    """(dataset, tokenizer, processor) through the model's own processor when
    --model_name_or_path is a transformers image-text-to-text checkpoint; None otherwise."""
    from llava.model.kinds import recognise_checkpoint

    kind = recognise_checkpoint(args.model_name_or_path)
    if kind is None or kind.name != "image-text-to-text" or args.vision_tower:
        return None
    from transformers import AutoProcessor

    from llava.data.processor_media import load_processor_dataset

    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    dataset = load_processor_dataset(
        args.data_path,
        processor,
        args.version or "auto",
        args.model_max_length,
        image_folder=args.image_folder,
        dataset_text_field=args.dataset_text_field,
        dataset_image_field=args.dataset_image_field,
        skip_bad_records=args.skip_bad_records,
        max_image_pixels=args.max_image_pixels,
    )
    return dataset, processor.tokenizer, processor


def composed_dataset(args: argparse.Namespace) -> tuple[SupervisedDataset, Any]:
    """(dataset, tokenizer) with a vision tower's (or a llava-hf folder's) image settings."""
    tokenizer = load_tokenizer(args)
    processor, num_image_tokens = image_processor_and_tokens(args)
    anyres = anyres_of_flags(args)
    dataset = load_supervised_dataset(
        args.data_path,
        tokenizer,
        args.version or "v1",
        args.model_max_length,
        image_processor=processor,
        num_image_tokens=num_image_tokens,
        image_folder=args.image_folder,
        image_aspect_ratio=args.image_aspect_ratio,
        dataset_text_field=args.dataset_text_field,
        dataset_image_field=args.dataset_image_field,
        skip_bad_records=args.skip_bad_records,
        mm_use_im_start_end=args.mm_use_im_start_end,
        max_image_pixels=args.max_image_pixels,
        anyres=anyres,
    )
    return dataset, tokenizer


def anyres_of_flags(args: argparse.Namespace) -> Any:
    """The AnyRes of --image_aspect_ratio anyres with --vision_tower's tiles, else None."""
    from llava.data.media import anyres_of, is_anyres

    if not is_anyres(args.image_aspect_ratio):
        return None
    if not args.vision_tower or not args.image_grid_pinpoints:
        raise ValueError(
            f"--image_aspect_ratio {args.image_aspect_ratio} needs --vision_tower (its tiles) "
            "and --image_grid_pinpoints"
        )
    from llava.model.vision_tower import describe_tower

    _, geometry = describe_tower(args.vision_tower, args.mm_vision_select_feature)
    return anyres_of(
        args.image_aspect_ratio,
        args.image_grid_pinpoints,
        args.mm_patch_merge_type,
        geometry,
        args.video_frames,
        args.video_pool_stride,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    through_processor = processor_dataset(args)
    if through_processor is not None:
        dataset, tokenizer, processor = through_processor
        image_ids = processor_image_ids(processor)
    else:
        (dataset, tokenizer), image_ids = composed_dataset(args), frozenset()
    for i in range(min(args.num, len(dataset))):
        info = describe(dataset, tokenizer, i, image_ids)
        print(json.dumps(info, ensure_ascii=False) if args.json else show(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
