"""Export to a transformers LlavaForConditionalGeneration folder (model, processor, template);
an anyres model (spatial_unpad) to LlavaNextForConditionalGeneration, an anyres_max_N one
(OneVision: its cap, several images, video) to LlavaOnevisionForConditionalGeneration.

    python -m llava.export_hf --model-path P [--model-base B] --output-dir D [--conv-mode v1]

Only models with an HF CLIP/SigLIP tower and an mlp2x_gelu projector have an equivalent there.
The processor's chat_template renders prompts as --conv-mode does here (the one trained with).
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers
from transformers import (
    LlavaNextProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from llava.compat import make_config_portable, portable_state_dict, save_processor
from llava.constants import IMAGE_TOKEN, VIDEO_TOKEN
from llava.conversation import get_template
from llava.data.anyres_data import anyres_image_processor, video_processor
from llava.model.builder import load_pretrained_model
from llava.model.hf_llava import (
    check_exportable,
    hf_class_name,
    hf_llava_config,
    hf_llava_state_dict,
    jinja_chat_template,
)


def add_media_token(model, tokenizer, token: str = IMAGE_TOKEN) -> int:
    """Give <image> (or <video>) a token id; its new embedding and output rows are zero (never
    predicted from a trained row, and its input embedding is always replaced by features)."""
    if token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= old_rows:
        model.language_model.resize_token_embeddings(token_id + 1, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[old_rows:] = 0
            model.get_output_embeddings().weight[old_rows:] = 0
        model.config.text_config.vocab_size = token_id + 1
    return token_id


def hf_processor(model, loaded, tokenizer, strategy: str, chat_template: str):
    """The processor of the export's class, preparing images as the model was trained."""
    geometry = model.vision_tower.geometry
    if model.anyres is not None and model.anyres.several_images_whole:  # OneVision's
        return LlavaOnevisionProcessor(
            image_processor=anyres_image_processor(loaded.image_processor, model.anyres),
            tokenizer=tokenizer,
            video_processor=video_processor(loaded.image_processor, model.anyres),
            # its count includes the CLS position that "default" drops
            num_image_tokens=geometry.num_patches + int(strategy == "default"),
            vision_feature_select_strategy=strategy,
            image_token=IMAGE_TOKEN,
            video_token=VIDEO_TOKEN,
            vision_aspect_ratio=model.config.image_aspect_ratio,
            chat_template=chat_template,
        )
    processor_class, image_processor = LlavaProcessor, loaded.image_processor
    if model.anyres is not None:  # LlavaNext's: the tiles its model packs
        processor_class = LlavaNextProcessor
        image_processor = anyres_image_processor(loaded.image_processor, model.anyres)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(geometry.has_cls_token),
        image_token=IMAGE_TOKEN,
        chat_template=chat_template,
    )


def chat_template_for(conv_mode: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja chat template of a --conv-mode (auto: the tokenizer's own)."""
    template = get_template(conv_mode)
    if not template.uses_tokenizer_template:
        return jinja_chat_template(template, tokenizer.bos_token or "", tokenizer.eos_token or "")
    if not tokenizer.chat_template:
        raise ValueError("--conv-mode auto needs a tokenizer with a chat_template")
    return tokenizer.chat_template


def export(
    model_path: str, output_dir: str, model_base: str | None = None, conv_mode: str = "v1"
) -> None:
    """Write model, processor and chat template; refuses a non-empty output folder."""
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"{output_dir!r} exists and is not empty; nothing was written")
    get_template(conv_mode)  # an unknown name fails before the model loads
    loaded = load_pretrained_model(model_path, model_base)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_exportable(model.config)
    # The tokenizer's and the processor's template are one file (chat_template.jinja).
    chat_template = tokenizer.chat_template = chat_template_for(conv_mode, tokenizer)
    image_token_id = add_media_token(model, tokenizer)
    target = hf_class_name(model.config)
    video_token_id = None
    if target == "LlavaOnevisionForConditionalGeneration":
        video_token_id = add_media_token(model, tokenizer, VIDEO_TOKEN)
    config = hf_llava_config(model.config, image_token_id, video_token_id)
    hf_model = getattr(transformers, target)(config)
    missing, unexpected = hf_model.load_state_dict(
        hf_llava_state_dict(model.state_dict()), strict=False
    )
    if missing or unexpected:
        raise RuntimeError(f"Export mapping incomplete: missing {missing}, unexpected {unexpected}")
    strategy = config.vision_feature_select_strategy
    processor = hf_processor(model, loaded, tokenizer, strategy, chat_template)
    # Weight names and config keys in the layout both transformers lines load.
    hf_model.save_pretrained(
        output_dir, state_dict=portable_state_dict(hf_model, hf_model.state_dict())
    )
    make_config_portable(output_dir)
    save_processor(processor, output_dir)  # in the layout both transformers lines read


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--conv-mode", default="v1", help="the chat template trained with")
    args = parser.parse_args(argv)
    export(args.model_path, args.output_dir, args.model_base, args.conv_mode)


if __name__ == "__main__":
    main()
