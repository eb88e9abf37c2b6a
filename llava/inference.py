"""Asking a loaded model about images: prompts, pixels, left-padded batched generation.

Three answerers, chosen by what was loaded (`answerer_for`): the composed model's (this
project's chat templates, the tower's image processor); that of a model with its own
processor (transformers' image-text-to-text kind: its chat template renders the prompt, its
processor makes the image inputs, both through the training data pipeline's encoder, so a
prompt's ids are those training saw for the same turns); and that of a model whose processor
takes a bare prompt and no chat template (PaliGemma's: one question per prompt, made by the
processor as training makes the prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN
from llava.conversation import USER, Segment, Turn
from llava.data.anyres_data import AnyResMedia
from llava.data.collator import pad_token_id_of
from llava.data.images import load_image, process_images
from llava.data.processor_collator import OWN_KEYS, ProcessorCollator, batching_rules
from llava.data.processor_media import (
    ProcessorConversationTokenizer,
    ProcessorMedia,
    PromptSuffixMedia,
    bare_prompt,
    first_difference,
    is_prompt_suffix,
)
from llava.data.tokenize import ConversationTokenizer, starts_with_bos
from llava.model.builder import LoadedModel

DEFAULT_TEMPLATE = "v1"  # the composed kind's, as LLaVA-1.5 trains
OWN_TEMPLATE = "auto"  # a processor's chat template: the only one its models train with


@dataclass
class Prompt:
    """One generation request: prompt ids (placeholders expanded) and its images' pixels."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W); anyres: (tiles, 3, H, W)
    image_sizes: torch.Tensor | None = None  # anyres: (num_images, 2), (height, width)
    media_kinds: torch.Tensor | None = None  # anyres: (num_images,), llava.data.media.TILED ...


def with_image_tag(question: str, num_images: int) -> str:
    """Questions without an <image> tag get one per image in front, as LLaVA's eval does."""
    if num_images and IMAGE_TOKEN not in question:
        return (IMAGE_TOKEN + "\n") * num_images + question
    return question


def template_name(loaded: LoadedModel, name: str | None, flag: str = "--conv-mode") -> str:
    """The chat template to render with: `name`, or by default the one the model trains with
    (v1 for the composed kind, the processor's own for a model that has one). A model with a
    processor takes only its own, as training does (train.check_flags_for_processor_model)."""
    if loaded.processor is None:
        return name or DEFAULT_TEMPLATE
    if name not in (None, OWN_TEMPLATE):
        how = (
            "takes a bare prompt, written by no chat template"
            if is_prompt_suffix(loaded.processor)
            else "renders conversations with its processor's own chat template"
        )
        raise ValueError(
            f"{flag} {name}: {type(loaded.model).__name__} {how} (as it trains, --version "
            f"{OWN_TEMPLATE}); leave {flag} out"
        )
    return OWN_TEMPLATE


def answerer_for(loaded: LoadedModel, conv_mode: str | None = None) -> Answerer:
    """The answerer of what was loaded: through its processor where it has one (a bare
    prompt where that processor takes one)."""
    if loaded.processor is None:
        answerer_class = Answerer
    elif is_prompt_suffix(loaded.processor):
        answerer_class = PromptSuffixAnswerer
    else:
        answerer_class = ProcessorAnswerer
    return answerer_class(loaded, template_name(loaded, conv_mode))


class Answerer:
    """Turns questions about images into answers with one loaded composed model (its tower's
    image processor, this project's chat templates)."""

    one_question_per_prompt = False  # True: a prompt holds no history (see PromptSuffixAnswerer)

    def __init__(self, loaded: LoadedModel, conv_mode: str = DEFAULT_TEMPLATE):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.conversation = ConversationTokenizer(
            loaded.tokenizer,
            conv_mode,
            self.model.num_image_tokens,
            mm_use_im_start_end=bool(self.model.config.mm_use_im_start_end),
        )
        anyres = getattr(self.model, "anyres", None)
        self.anyres_media = None
        if anyres is not None:  # each image's tokens and tiles by its size
            self.anyres_media = AnyResMedia(
                anyres, loaded.image_processor, self.conversation.image_ids_for
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, image_sources: Sequence[Any]) -> torch.Tensor | None:
        if not image_sources:
            return None
        images = [load_image(source) for source in image_sources]
        aspect = getattr(self.model.config, "image_aspect_ratio", "square") or "square"
        return process_images(images, self.loaded.image_processor, aspect)

    def prompt(self, turns: list[Turn], image_sources: Sequence[Any] = ()) -> Prompt:
        if self.anyres_media is None:
            return Prompt(self.conversation.encode_prompt(turns), self.pixels(image_sources))
        images = [load_image(source) for source in image_sources]
        kinds = self.anyres_media.kinds(images)
        image_ids = self.anyres_media.media_ids(kinds, [image.size for image in images])
        input_ids = self.conversation.encode_prompt(turns, image_ids)
        if not images:
            return Prompt(input_ids, None)
        pixels = self.anyres_media.pixels(images, kinds)
        return Prompt(
            input_ids, pixels["pixel_values"], pixels["image_sizes"], pixels["media_kinds"]
        )

    def question_prompt(self, question: str, image_sources: Sequence[Any] = ()) -> Prompt:
        turns = [Turn(USER, with_image_tag(question, len(image_sources)))]
        return self.prompt(turns, image_sources)

    def batch(self, prompts: list[Prompt]) -> dict[str, torch.Tensor | None]:
        """The prompts left-padded to one width, with every image's pixels in prompt order."""
        pad_id = self.tokenizer.pad_token_id
        width = max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids)
            attention_mask[row, width - len(prompt.input_ids) :] = 1
        images = [p.pixel_values for p in prompts if p.pixel_values is not None]
        pixel_values = torch.cat(images).to(self.device, self.model.dtype) if images else None
        batch = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "pixel_values": pixel_values,
        }
        sizes = [p.image_sizes for p in prompts if p.image_sizes is not None]
        if sizes:
            batch["image_sizes"] = torch.cat(sizes).to(self.device)
            kinds = [p.media_kinds for p in prompts if p.media_kinds is not None]
            batch["media_kinds"] = torch.cat(kinds).to(self.device)
        return batch

    def new_tokens(self, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """LlavaForCausalLM.generate() returns the new tokens alone."""
        return output

    def generate(self, prompts: list[Prompt], **generate_kwargs: Any) -> list[str]:
        """Answers for a batch of prompts, left-padded so every answer starts at one column.

        generate() derives position ids from the attention mask (its cumsum; Qwen-VL's M-RoPE
        from the mask too), so padding shifts no row's positions: a batch answers as each
        prompt alone.
        """
        inputs = self.batch(prompts)
        output = self.model.generate(
            **inputs, pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs
        )
        answers = self.new_tokens(output, inputs["input_ids"].shape[1])
        return [
            text.strip() for text in self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        ]


@dataclass
class ProcessorPrompt:
    """One generation request to a model with a processor: the prompt's ids and the
    processor's other outputs for it (pixel_values, image_grid_thw, ...), each with its own
    leading dim as the processor returns it for one text."""

    input_ids: list[int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class ProcessorAnswerer(Answerer):
    """Answers from a model with its own processor (transformers' image-text-to-text kind).

    Prompts are rendered and encoded as the training data is (ProcessorConversationTokenizer
    with add_generation_prompt, each image expanded by ProcessorMedia for its size); the
    processor then runs on the rendered text and the images, and its input_ids must equal
    those. Batches are padded on the left by the training collator's rules.
    """

    def __init__(self, loaded: LoadedModel, conv_mode: str = OWN_TEMPLATE):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.media = self.media_of(loaded.processor)
        self.conversation = self.conversation_of(loaded.processor, conv_mode)
        self.collator = ProcessorCollator(
            pad_token_id_of(self.tokenizer), batching_rules(self.media), padding_side="left"
        )

    def media_of(self, processor: Any) -> Any:
        return ProcessorMedia(processor)

    def conversation_of(self, processor: Any, conv_mode: str) -> Any:
        return ProcessorConversationTokenizer(processor, conv_mode, self.media)

    def prompt(self, turns: list[Turn], image_sources: Sequence[Any] = ()) -> ProcessorPrompt:
        images = [load_image(source) for source in image_sources]
        segments = self.conversation.render(turns, add_generation_prompt=True)  # <image> tags
        placed, image_ids = self.media.place(segments, [image.size for image in images])
        unsupervised = [Segment(segment.text, False) for segment in placed]
        input_ids = self.conversation.encode_segments([unsupervised], [image_ids])[0].input_ids
        text = self.media.text(segments)
        outputs = self.media(text, images, not starts_with_bos(self.tokenizer, text))
        theirs = outputs["input_ids"][0].tolist()
        if theirs != input_ids:
            at = first_difference(input_ids, theirs)
            raise ValueError(
                f"the processor's input_ids differ from the prompt built turn by turn at "
                f"position {at} (lengths {len(theirs)} and {len(input_ids)})"
            )
        extras = {key: value for key, value in outputs.items() if key not in OWN_KEYS}
        return ProcessorPrompt(input_ids, extras)

    def batch(self, prompts: list[ProcessorPrompt]) -> dict[str, torch.Tensor]:
        samples = [
            {
                "input_ids": torch.tensor(p.input_ids),
                "labels": torch.full((len(p.input_ids),), IGNORE_INDEX),
                **p.inputs,
            }
            for p in prompts
        ]
        batch = self.collator(samples)
        del batch["labels"]
        return {
            key: value.to(self.device, self.model.dtype)
            if value.is_floating_point()
            else value.to(self.device)
            for key, value in batch.items()
        }

    def new_tokens(self, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """transformers' generate() returns the prompt, then the new tokens."""
        return output[:, prompt_width:]


class PromptSuffixAnswerer(ProcessorAnswerer):
    """Answers from a model whose processor takes a bare prompt and no chat template
    (`is_prompt_suffix`: PaliGemma's, Fuyu's).

    A prompt is one question about its images, made by one processor call as training makes
    the prefix (PromptSuffixMedia without a suffix): the images' tokens, BOS, the question
    without its <image> tags, a newline. Its token_type_ids are all 0, so generate() attends to
    the whole prompt both ways, as training did to the prefix, and causally to the answer. A
    history of turns has no place in such a prompt and is refused. Batches are padded on the
    left by the training collator's rules.
    """

    one_question_per_prompt = True

    def media_of(self, processor: Any) -> Any:
        return PromptSuffixMedia(processor)

    def conversation_of(self, processor: Any, conv_mode: str) -> None:
        """None: the processor writes the whole prompt, no conversation is rendered."""
        return None

    def prompt(self, turns: list[Turn], image_sources: Sequence[Any] = ()) -> ProcessorPrompt:
        """One user turn and its images as the processor's prompt (ids and model inputs)."""
        name = type(self.model).__name__
        roles = [turn.role for turn in turns]
        if roles != [USER]:
            raise ValueError(
                f"{name} takes one question per prompt (its processor writes a bare prompt, "
                f"with no chat template for a conversation); these turns are {roles}: ask "
                "each question on its own"
            )
        if not image_sources:
            raise ValueError(f"{name} answers questions about images: give each one an image")
        images = [load_image(source) for source in image_sources]
        outputs = self.media(bare_prompt(turns[0].text), images, suffix=None)
        extras = {key: value for key, value in outputs.items() if key not in OWN_KEYS}
        return ProcessorPrompt(outputs["input_ids"][0].tolist(), extras)


def sampling_kwargs(temperature: float, top_p: float | None, num_beams: int, max_new_tokens: int):
    """generate() arguments: greedy at temperature 0, sampling above."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs
