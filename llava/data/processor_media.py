"""The media encoder of transformers image-text-to-text models: images as their processor makes them.

A Qwen2-VL, SmolVLM/Idefics3, Gemma 3 or llava-hf checkpoint comes with a processor that
writes each image into the text as a run of tokens whose number depends on the image's size
(Qwen2-VL's grid, Idefics3's tiles), and makes the pixel inputs its model expects. Here:

- conversations render with the processor's chat template, images as content parts; the
  template's placeholder for an image (`<image>\\n`, `<|vision_start|><|image_pad|><|vision_end|>`,
  `<start_of_image>`, ...) is found once by rendering with and without an image;
- each image becomes the ids the processor gives that placeholder for an image of its size,
  learnt from a blank image of that size (cached by size) and the size read from the file's
  header, so lengths and truncation are exact before any image is decoded; labels stay by
  construction (llava.data.tokenize);
- when a sample is loaded the processor runs on the kept text and images, giving every model
  input (pixel_values, image_grid_thw, pixel_attention_mask, token_type_ids, ...), and its
  input_ids must equal the ids built turn by turn;
- `ProcessorCollator` (llava.data.processor_collator) pads and batches those inputs;
- a LLaVA .json list, a .jsonl file or tar shards are read row by row and what building found
  is cached, as for the composed models (llava.data.dataset.load_rows_once), keyed by the
  processor too (its chat template, its own and its image processor's settings): a second
  start, on any rank, reads no image header and tokenizes nothing.

A processor without a chat template whose `__call__` takes `suffix=` (PaliGemma's: a prompt, and
the text to learn after it) trains on single-turn records through `PromptSuffixDataset`: one
processor call per sample gives its ids, labels and model inputs.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from llava.compat import TRANSFORMERS_5
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN
from llava.conversation import (
    ASSISTANT,
    USER,
    ChatTemplate,
    Segment,
    Turn,
    apply_parts_template,
    content_parts,
    get_template,
    render_auto,
)
from llava.data.collator import pad_token_id_of
from llava.data.dataset import (
    DataSummary,
    RowRecords,
    RowStore,
    SupervisedDataset,
    length_cache_key,
    load_rows_once,
)
from llava.data.forked import available_cpus
from llava.data.formats import BadRecordError, Record
from llava.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from llava.data.length_cache import CachedBuild
from llava.data.processor_collator import (
    OWN_KEYS,
    PROBE_SIZE,
    PROBE_TEXT,
    ProcessorCollator,
    batching_rules,
)
from llava.data.tokenize import (
    KEPT,
    TOO_LONG,
    ConversationTokenizer,
    EncodedConversation,
    TextEncoder,
    TokenizedSample,
    fit,
    starts_with_bos,
)

Size = tuple[int, int]  # (width, height), as PIL gives it


# -- the template's image placeholder -----------------------------------------------------------
def units(text: str, encoder: TextEncoder) -> list[str]:
    """A text as special tokens and single characters, so a diff never splits a special token."""
    return [
        unit
        for piece, special in encoder.split_special(text)
        for unit in ([piece] if special else list(piece))
    ]


def has_chat_template(processor: Any) -> bool:
    owners = (processor, processor.tokenizer)
    return any(getattr(owner, "chat_template", None) for owner in owners)


def declared_keys(annotation: Any) -> set[str]:
    """The keys a TypedDict declares, those of the TypedDicts it holds included."""
    if not typing.is_typeddict(annotation):
        return set()
    hints = annotation.__annotations__
    return set(hints).union(*(declared_keys(hint) for hint in hints.values()))


def takes_suffix(processor: Any) -> bool:
    """Whether the processor's `__call__` takes `suffix=`, text to learn after the prompt: a
    parameter (5.x) or a key of its `**kwargs: Unpack[...Kwargs]` (4.x PaliGemma's)."""
    parameters = inspect.signature(processor.__call__).parameters.values()
    for parameter in parameters:
        if parameter.name == "suffix":
            return True
        if parameter.kind is parameter.VAR_KEYWORD:
            unpacked = typing.get_args(parameter.annotation)
            if any("suffix" in declared_keys(annotation) for annotation in unpacked):
                return True
    return False


def is_prompt_suffix(processor: Any) -> bool:
    """A processor without a chat template: it takes a bare prompt about its images, and the
    text learnt is the answer after it (its `suffix=` where it takes one, as PaliGemma's; else
    appended, as for Fuyu's, whose processor ends the prompt with its beginning-of-answer
    token)."""
    return not has_chat_template(processor)


def find_placeholder(processor: Any, encoder: TextEncoder) -> str:
    """The text the processor's chat template writes for one image part.

    A user turn is rendered with and without an image after its text; the placeholder is what
    the image adds. A template that changes anything else when an image is added is refused,
    and so is a processor without a chat template (one that takes a bare prompt).
    """
    if not has_chat_template(processor):
        raise ValueError(
            f"{type(processor).__name__} has no chat_template (nor has its tokenizer): it takes "
            "a bare prompt and the answer after it, so it trains on single-turn records "
            "(PromptSuffixDataset, --version auto) but cannot place images in a conversation"
        )
    without = units(apply_parts_template(processor, [Turn(USER, PROBE_TEXT)], False), encoder)
    with_image = apply_parts_template(processor, [Turn(USER, PROBE_TEXT + IMAGE_TOKEN)], False)
    with_image = units(with_image, encoder)
    start = 0
    while start < len(without) and without[start] == with_image[start]:
        start += 1
    end = 0
    while end < len(without) - start and without[-1 - end] == with_image[-1 - end]:
        end += 1
    if len(without) - start - end != 0 or len(with_image) - start - end <= 0:
        raise ValueError(
            "the processor's chat template does not render an image part as a placeholder "
            "inserted into the text; this data pipeline cannot place its images"
        )
    return "".join(with_image[start : len(with_image) - end])


# -- one image's ids ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageExpansion:
    """What the processor makes of the placeholder for an image of one size.

    `ids` run from its first to its last special token, so they are the same wherever the image
    stands; `lead` and `trail` are plain text the processor writes around them (Gemma 3's
    blank lines, llava's newline), tokenized with the neighbouring text as the processor does.
    """

    lead: str
    ids: tuple[int, ...]
    trail: str


class ProcessorMedia:
    """A processor's images as token ids (by size, before decoding) and as model inputs."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.encoder = TextEncoder(self.tokenizer)
        self.special_ids = set(self.encoder.special_ids.values())
        self.placeholder = find_placeholder(processor, self.encoder)
        self.expansions: dict[Size, ImageExpansion] = {}

    def __call__(
        self, text: str, images: Sequence[Image.Image], add_special_tokens: bool
    ) -> dict[str, torch.Tensor]:
        """The processor's outputs for one text and its images (each tensor with its own
        leading dim: 1 for per-sample outputs, the image count for per-image ones)."""
        outputs = self.processor(
            text=[text],
            images=[list(images)] if images else None,
            add_special_tokens=add_special_tokens,
            return_tensors="pt",
        )
        return dict(outputs)

    def probes(self) -> list[dict[str, torch.Tensor]]:
        """The processor's outputs on a text-only, a one-image and a two-image probe (blank
        images), which `batching_rules` reads."""
        blank = Image.new("RGB", PROBE_SIZE)
        return [
            self(PROBE_TEXT, [], add_special_tokens=False),
            self(PROBE_TEXT + self.placeholder, [blank], add_special_tokens=False),
            self(PROBE_TEXT + self.placeholder * 2, [blank, blank], add_special_tokens=False),
        ]

    def expansion(self, size: Size) -> ImageExpansion:
        """The ids of an image of `size` (width, height), from a blank image of that size.

        The processors this serves expand an image by its size alone (the real image's pixels
        never change the ids); a test checks this against real images for every family.
        """
        if size not in self.expansions:
            blank = Image.new("RGB", size)
            text = self.probe_prefix + self.placeholder
            ids = self(text, [blank], add_special_tokens=False)["input_ids"][0].tolist()
            self.expansions[size] = self.split_expansion(self.after_prefix(ids))
        return self.expansions[size]

    @functools.cached_property
    def leading_ids(self) -> list[int]:
        """The ids the processor puts before a text that does not begin with BOS: the
        tokenizer's (BOS for Llama, none for Qwen), or the processor's own (Molmo2's writes BOS
        in front of such a text)."""
        ids = self(PROBE_TEXT, [], add_special_tokens=True)["input_ids"][0].tolist()
        plain = self.encoder.encode_raw([PROBE_TEXT])[0]
        for start in range(len(ids) - len(plain) + 1):
            if ids[start : start + len(plain)] == plain:
                return ids[:start]
        raise ValueError(
            f"the processor changes the text {PROBE_TEXT!r} itself (ids {ids}); its "
            "conversations cannot be built turn by turn"
        )

    @functools.cached_property
    def probe_prefix(self) -> str:
        """Text an image is expanded behind: BOS (mllama's processor writes images and BOS in
        front of a text without one) and a special token (so nothing merges across it)."""
        bos = self.tokenizer.bos_token or ""
        names = ("eos_token", "pad_token", "unk_token", "bos_token")
        tokens = [getattr(self.tokenizer, name, None) for name in names]
        return bos + next(token for token in tokens if token in self.encoder.special_ids)

    @functools.cached_property
    def probe_prefix_ids(self) -> list[int]:
        return self(self.probe_prefix, [], add_special_tokens=False)["input_ids"][0].tolist()

    def after_prefix(self, ids: list[int]) -> list[int]:
        """The ids after those of `probe_prefix` (found by the processor on the text alone)."""
        prefix = self.probe_prefix_ids
        if ids[: len(prefix)] != prefix:
            raise ValueError(
                "the processor changes the text before an image; its images cannot be placed "
                "by construction"
            )
        return ids[len(prefix) :]

    def split_expansion(self, ids: list[int]) -> ImageExpansion:
        """lead text | special-token-bounded ids | trail text, of one expanded placeholder."""
        special = [k for k, token_id in enumerate(ids) if token_id in self.special_ids]
        if not special:
            raise ValueError(
                f"the processor expands the image placeholder {self.placeholder!r} into no "
                "special token; its images cannot be placed by construction"
            )
        first, last = special[0], special[-1]
        lead, trail = self.text_of(ids[:first]), self.text_of(ids[last + 1 :])
        return ImageExpansion(lead, tuple(ids[first : last + 1]), trail)

    def text_of(self, ids: list[int]) -> str:
        """Plain text back from its ids; one that does not re-encode to them is refused."""
        text = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""
        if ids and self.encoder.encode_raw([text])[0] != ids:
            raise ValueError(
                f"the processor writes text {text!r} around each image that does not "
                "tokenize back to its ids; its images cannot be placed by construction"
            )
        return text

    def tag(self, segments: list[Segment]) -> list[Segment]:
        """The template's placeholders as <image> tags (where images are, whatever the family)."""
        return [
            Segment(s.text.replace(self.placeholder, IMAGE_TOKEN), s.supervised) for s in segments
        ]

    def place(
        self, segments: list[Segment], sizes: Sequence[Size]
    ) -> tuple[list[Segment], list[tuple[int, ...]]]:
        """Segments whose tags carry each image's lead and trail text, and each image's ids."""
        num_tags = sum(segment.text.count(IMAGE_TOKEN) for segment in segments)
        if num_tags != len(sizes):
            raise ValueError(
                f"the rendered text places {num_tags} images but the record has {len(sizes)}"
            )
        expansions = iter([self.expansion(size) for size in sizes])
        placed, image_ids = [], []
        for segment in segments:
            pieces = segment.text.split(IMAGE_TOKEN)
            text = pieces[0]
            for piece in pieces[1:]:
                expansion = next(expansions)
                image_ids.append(expansion.ids)
                text += expansion.lead + IMAGE_TOKEN + expansion.trail + piece
            placed.append(Segment(text, segment.supervised))
        return placed, image_ids

    def text(self, segments: list[Segment]) -> str:
        """The text the processor is given: the tagged segments with the template's placeholders."""
        return "".join(segment.text for segment in segments).replace(IMAGE_TOKEN, self.placeholder)


# -- conversations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderedConversation:
    """A conversation's segments (images as <image> tags) and its ids before truncation."""

    segments: list[Segment]
    encoded: EncodedConversation


class ProcessorConversationTokenizer(ConversationTokenizer):
    """Turns and image sizes -> ids and labels, each image expanded as the processor expands it.

    `version` auto renders with the processor's chat template on content parts; a named
    template renders as for the composed models and its <image> tags become the processor's
    placeholder.
    """

    def __init__(self, processor: Any, template: ChatTemplate | str, media: ProcessorMedia):
        super().__init__(processor.tokenizer, template, num_image_tokens=0, fresh_after_image=False)
        self.processor = processor
        self.media = media
        self.leading_ids = media.leading_ids

    def render(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        if not self.template.uses_tokenizer_template:
            return super().render(turns, add_generation_prompt)
        chat_text = functools.partial(apply_parts_template, self.processor)
        return self.media.tag(render_auto(self.tokenizer, turns, add_generation_prompt, chat_text))

    def encode_segments(self, segments_list, image_ids_list=None) -> list[EncodedConversation]:
        if image_ids_list is None and any(
            IMAGE_TOKEN in segment.text for segments in segments_list for segment in segments
        ):
            raise ValueError("a processor's images need their sizes: use encode_with_sizes")
        return super().encode_segments(segments_list, image_ids_list)

    def encode_with_sizes(
        self, turns_list: list[list[Turn]], sizes_list: list[list[Size]]
    ) -> list[RenderedConversation | ValueError]:
        """Many conversations with their images' sizes; one that fails gives its error.

        Text of all of them is encoded in one batched call, as `encode_many` does."""
        rendered: list[list[Segment] | ValueError] = []
        placed, image_ids = [], []  # of the conversations that render
        for turns, sizes in zip(turns_list, sizes_list):
            try:
                segments = self.render(list(turns))
                segments_placed, ids = self.media.place(segments, sizes)
            except ValueError as error:
                rendered.append(error)
                continue
            rendered.append(segments)
            placed.append(segments_placed)
            image_ids.append(ids)
        encoded = iter(self.encode_segments(placed, image_ids))
        return [
            item if isinstance(item, ValueError) else RenderedConversation(item, next(encoded))
            for item in rendered
        ]


def kept_segments(rendered: RenderedConversation, length: int) -> list[Segment]:
    """The segments of the first `length` ids: `fit` cuts only right after an answer."""
    if length == len(rendered.encoded.input_ids):
        return rendered.segments
    answers = rendered.encoded.turn_ends.index(length) + 1
    kept, seen = [], 0
    for segment in rendered.segments:
        kept.append(segment)
        seen += int(segment.supervised)
        if seen == answers:
            break
    return kept


def first_difference(ours: list[int], theirs: list[int]) -> int:
    pairs = zip(ours, theirs)
    return next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))


# -- the dataset --------------------------------------------------------------------------------
class ProcessorDataset(SupervisedDataset):
    """Records -> {"input_ids" (T,), "labels" (T,), and the processor's other outputs}.

    Lengths come from the images' header sizes at construction; `__getitem__` decodes the kept
    images and runs the processor, whose input_ids must equal the ids built turn by turn.
    `records` is a list or RowRecords (read row by row), built in forked children
    (`build_workers`) or replayed from the length cache (`cached`), as SupervisedDataset's: what
    `load` needs (the processor, its media and conversation tokenizer) is set up before any of
    them, and what they learn lazily (an image size's ids) is learnt again where needed.
    """

    def __init__(
        self,
        records: Sequence[Record] | RowRecords,
        processor: Any,
        template: ChatTemplate | str,
        model_max_length: int,
        skip_bad_records: bool = False,
        summary: DataSummary | None = None,
        skipped: Sequence[BadRecordError] = (),
        skip_log_dir: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        cached: CachedBuild | None = None,
        build_workers: int = 1,
    ):
        self.processor = processor
        self.media = ProcessorMedia(processor)
        conversation_tokenizer = ProcessorConversationTokenizer(processor, template, self.media)
        super().__init__(
            records,
            processor.tokenizer,
            conversation_tokenizer.template,
            model_max_length,
            skip_bad_records=skip_bad_records,
            summary=summary,
            skipped=skipped,
            skip_log_dir=skip_log_dir,
            max_image_pixels=max_image_pixels,
            conversation_tokenizer=conversation_tokenizer,
            cached=cached,
            build_workers=build_workers,
        )

    def add_block(self, records: list[Record]) -> None:
        """Read image sizes, tokenize (one batched call) and keep what has something to learn."""
        sized: list[tuple[Record, list[Size]]] = []
        for record in records:
            try:
                sized.append((record, self.sizes(record)))
            except BadRecordError as error:
                self.bad(error)
        encode = self.conversation_tokenizer.encode_with_sizes
        rendered = encode([list(r.turns) for r, _ in sized], [sizes for _, sizes in sized])
        for (record, _), item in zip(sized, rendered):
            if isinstance(item, ValueError):
                self.bad(BadRecordError(record.source, record.index, str(item), record.id))
            else:
                self.add(record, *fit(item.encoded, self.model_max_length))

    def decode_images(self, record: Record, num_images: int) -> list[Image.Image]:
        try:
            return [load_image(s, self.max_image_pixels) for s in record.images[:num_images]]
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None

    def load(self, i: int) -> dict[str, torch.Tensor]:
        record, num_images = self.samples[i]
        images = self.decode_images(record, num_images)
        encode = self.conversation_tokenizer.encode_with_sizes
        rendered = encode([list(record.turns)], [self.sizes(record, images)])[0]
        if isinstance(rendered, ValueError):  # rendered fine at construction: sizes changed
            raise BadRecordError(record.source, record.index, str(rendered), record.id)
        sample, _ = fit(rendered.encoded, self.model_max_length)
        if sample is None or sample.num_images != num_images:
            reason = "its images decode to other sizes than their headers say"
            raise BadRecordError(record.source, record.index, reason, record.id)
        text = self.media.text(kept_segments(rendered, len(sample.input_ids)))
        inputs = self.media(text, images, not starts_with_bos(self.media.tokenizer, text))
        self.check_ids(record, sample.input_ids, inputs["input_ids"][0].tolist())
        extras = {key: value for key, value in inputs.items() if key not in OWN_KEYS}
        return {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),  # (T,)
            "labels": torch.tensor(sample.labels, dtype=torch.long),  # (T,)
            **extras,  # the processor's: pixel_values, image_grid_thw, token_type_ids, ...
        }

    def check_ids(self, record: Record, ours: list[int], theirs: list[int]) -> None:
        """The processor's input_ids must be the ids built turn by turn (labels rest on them)."""
        if ours == theirs:
            return
        at = first_difference(ours, theirs)
        show = self.media.tokenizer.convert_ids_to_tokens
        reason = (
            f"the processor's input_ids differ from the ones built turn by turn at position {at} "
            f"(lengths {len(theirs)} and {len(ours)}): processor {show(theirs[at : at + 4])}, "
            f"built {show(ours[at : at + 4])}"
        )
        raise BadRecordError(record.source, record.index, reason, record.id)


# -- prompt + suffix processors (PaliGemma's, Fuyu's) -----------------------------------------------
ONE_TURN = "a prompt+suffix processor takes one user turn and one answer"


def prompt_and_answer(turns: Sequence[Turn]) -> tuple[str, str]:
    """(prefix, suffix) of a single-turn record: the user's text without its <image> tags (such
    processors place the images themselves) and the answer. Anything else raises ValueError."""
    roles = [turn.role for turn in turns]
    if roles != [USER, ASSISTANT] or not turns[1].text.strip():
        raise ValueError(f"{ONE_TURN}; this record's turns are {roles}")
    return bare_prompt(turns[0].text), turns[1].text


def bare_prompt(text: str) -> str:
    """A user turn's text as a prompt+suffix processor's prompt: its text without the <image>
    tags (the processor places the images itself, in front), stripped."""
    parts = content_parts(text)
    return "".join(part["text"] for part in parts if part["type"] == "text").strip()


class PromptSuffixMedia:
    """A processor that takes a bare prompt and its images, with the answer (the suffix) after
    it, as model inputs.

    One processor call per sample. A processor that takes `suffix=` (PaliGemma's) writes the
    ids, the labels (the prompt masked, the suffix and EOS supervised) and every model input
    (pixel_values, token_type_ids: 1 on the suffix). Another (Fuyu's) makes the prompt's ids
    and inputs, and the suffix's ids and EOS follow them (`with_suffix`).
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.blanks: dict[Size, Image.Image] = {}
        self.writes_labels = takes_suffix(processor)
        self.image_tag = self.prompt_image_tag()

    def prompt_image_tag(self) -> str:
        """The processor's image token where a prompt holds it once per image, in front
        (PaliGemma's warns without it), or "" where the processor writes it itself (Fuyu's
        refuses it): whichever of the two it takes on a one-image probe, in that order."""
        image_token = getattr(self.processor, "image_token", None) or ""
        blank = self.blank(PROBE_SIZE)
        for tag in dict.fromkeys((image_token, "")):
            try:
                self.processor(text=[tag + PROBE_TEXT], images=[[blank]], return_tensors="pt")
            except ValueError:
                continue
            return tag
        raise ValueError(
            f"{type(self.processor).__name__} takes no bare prompt with one image, with its "
            f"image token {image_token!r} in front or without it"
        )

    def __call__(
        self, prefix: str, images: Sequence[Image.Image], suffix: str | None
    ) -> dict[str, torch.Tensor]:
        """The processor's outputs for one sample (leading dim 1, or the image count); with
        `suffix` None, those of a prompt to generate after (token_type_ids all 0: the prefix)."""
        if not images:
            raise ValueError(
                f"{type(self.processor).__name__} takes a bare prompt about its images: "
                "this one has none"
            )
        kwargs = {"suffix": [suffix]} if self.writes_labels and suffix is not None else {}
        outputs = self.processor(
            text=[self.image_tag * len(images) + prefix],
            images=[list(images)],
            return_tensors="pt",
            **kwargs,
        )
        outputs = dict(outputs)
        if self.writes_labels or suffix is None:
            return outputs
        return with_suffix(outputs, self.suffix_ids(suffix))

    def suffix_ids(self, suffix: str) -> list[int]:
        """The answer's ids as the tokenizer writes a text alone, then EOS."""
        ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def blank(self, size: Size) -> Image.Image:
        if size not in self.blanks:
            self.blanks[size] = Image.new("RGB", size)
        return self.blanks[size]

    def length(self, prefix: str, sizes: Sequence[Size], suffix: str) -> int:
        """The sample's number of ids, from blank images of its images' sizes: the ids depend on
        the sizes alone (PaliGemma writes image_seq_length tokens for any image)."""
        blanks = [self.blank(size) for size in sizes]
        return self(prefix, blanks, suffix)["input_ids"].shape[1]

    def probes(self) -> list[dict[str, torch.Tensor] | None]:
        """No text-only probe (a bare prompt is about images), a one-image one, and a
        two-image one where the processor takes two images (Fuyu's takes one)."""
        blank = self.blank(PROBE_SIZE)
        try:
            two = self(PROBE_TEXT, [blank] * 2, PROBE_TEXT)
        except ValueError:
            two = None
        return [None, self(PROBE_TEXT, [blank], PROBE_TEXT), two]


def with_suffix(outputs: dict[str, torch.Tensor], suffix_ids: list[int]) -> dict[str, torch.Tensor]:
    """A prompt's processor outputs with the suffix's ids after its input_ids, labels on them
    alone, attention on them, and every other per-token output (1, T, ...) zero after the
    prompt (the suffix is text)."""
    prompt_ids = outputs["input_ids"]  # (1, T)
    length = prompt_ids.shape[1]
    suffix = torch.tensor([suffix_ids], dtype=prompt_ids.dtype)  # (1, S)
    extended = {}
    for key, value in outputs.items():
        if key == "input_ids":
            extended[key] = torch.cat([value, suffix], dim=1)
        elif value.ndim >= 2 and value.shape[0] == 1 and value.shape[1] == length:
            fill = 1 if key == "attention_mask" else 0
            tail = torch.full((1, len(suffix_ids), *value.shape[2:]), fill, dtype=value.dtype)
            extended[key] = torch.cat([value, tail], dim=1)
        else:
            extended[key] = value
    extended["labels"] = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), suffix], dim=1)
    return extended


class PromptSuffixDataset(ProcessorDataset):
    """Single-turn records -> {"input_ids" (T,), "labels" (T,), and the processor's other outputs}
    through a prompt+suffix processor (`is_prompt_suffix`).

    Other records (several turns, a system turn, no answer, none of the images the processor
    needs) are bad records. A sample longer than model_max_length is dropped, never cut: the
    processor writes the whole answer and its EOS.
    """

    def __init__(
        self,
        records: Sequence[Record] | RowRecords,
        processor: Any,
        template: ChatTemplate | str,
        model_max_length: int,
        **dataset_options: Any,
    ):
        """`dataset_options`: SupervisedDataset's (skip_bad_records, summary, skipped, cached,
        build_workers, ...)."""
        if not TRANSFORMERS_5:
            raise ValueError(
                "a prompt+suffix processor trains on transformers 5.x only: on 4.x PaliGemma's "
                "forward masks the prefix from its labels alone, which the trainer keeps out of "
                "the forward, so a training step would see the answers (and 4.x's Fuyu "
                "processor lays out its prompts otherwise, untested here)"
            )
        template = get_template(template) if isinstance(template, str) else template
        if not template.uses_tokenizer_template:
            raise ValueError(
                f"{type(processor).__name__} takes a bare prompt and a suffix, written by no "
                f"chat template: pass --version auto, not {template.name}"
            )
        self.processor = processor
        self.media = PromptSuffixMedia(processor)
        SupervisedDataset.__init__(
            self, records, processor.tokenizer, template, model_max_length, **dataset_options
        )

    def add_block(self, records: list[Record]) -> None:
        """Measure each record with blank images of its images' header sizes."""
        for record in records:
            try:
                prefix, answer = prompt_and_answer(record.turns)
                length = self.media.length(prefix, self.sizes(record), answer)
            except ValueError as error:  # BadRecordError included
                reason = getattr(error, "reason", str(error))
                self.bad(BadRecordError(record.source, record.index, reason, record.id))
                continue
            if length > self.model_max_length:
                self.add(record, None, TOO_LONG)
            else:  # `add` reads the length and image count; the ids are made when loaded
                ids = [IGNORE_INDEX] * length
                self.add(record, TokenizedSample(ids, ids, len(record.images)), KEPT)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        record, num_images = self.samples[i]
        prefix, answer = prompt_and_answer(record.turns)
        images = self.decode_images(record, num_images)
        try:
            inputs = self.media(prefix, images, answer)
        except ValueError as error:
            raise BadRecordError(record.source, record.index, str(error), record.id) from None
        input_ids = inputs.pop("input_ids")[0]  # (T,)
        if len(input_ids) != self.lengths[i]:
            reason = (
                f"the processor gives {len(input_ids)} ids for its decoded images, "
                f"{self.lengths[i]} for blank images of their header sizes"
            )
            raise BadRecordError(record.source, record.index, reason, record.id)
        labels = inputs.pop("labels")[0]  # (T,)
        extras = {key: value for key, value in inputs.items() if key not in OWN_KEYS}
        return {"input_ids": input_ids, "labels": labels, **extras}


# -- entry --------------------------------------------------------------------------------------
def load_processor_dataset(
    data_path: str,
    processor: Any,
    version: str = "auto",
    model_max_length: int = 2048,
    image_folder: str | None = None,
    dataset_text_field: str | None = None,
    dataset_image_field: str | None = None,
    skip_bad_records: bool = False,
    skip_log_dir: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    build_workers: int = 1,
) -> ProcessorDataset:
    """Read a data path (any supported format) into a ProcessorDataset (a PromptSuffixDataset
    for a processor that takes a prompt and a suffix).

    As load_supervised_dataset (llava.data.dataset.load_rows_once): a LLaVA .json list, a .jsonl
    file, tar shards or a Hugging Face dataset are read row by row, first built by
    `build_workers` forked processes, and what building found is cached next to them, keyed by
    the processor too (llava.data.length_cache.processor_fingerprint): a second start, on any
    rank, tokenizes nothing and reads no image header."""
    template = get_template(version)
    dataset_class = PromptSuffixDataset if is_prompt_suffix(processor) else ProcessorDataset

    def dataset(records: Any, **how: Any) -> ProcessorDataset:
        """`records` built (`how`: skipped, build_workers or cached) with this call's options."""
        return dataset_class(
            records, processor, template, model_max_length, skip_bad_records=skip_bad_records,
            summary=DataSummary(source=data_path), skip_log_dir=skip_log_dir,
            max_image_pixels=max_image_pixels, **how,
        )  # fmt: skip

    def cache_key(store: RowStore, reader: list[Any]) -> dict[str, Any]:
        return length_cache_key(
            store, dataset_class, processor.tokenizer, template, model_max_length, reader,
            images=[], anyres=None, max_image_pixels=max_image_pixels, processor=processor,
        )  # fmt: skip

    return load_rows_once(
        data_path, image_folder, dataset_text_field, dataset_image_field, skip_bad_records,
        skip_log_dir, build_workers, dataset, cache_key,
    )  # fmt: skip


def build_processor_data(
    processor: Any,
    data_args: Any,
    version: str = "auto",
    model_max_length: int = 2048,
    padding_side: str = "right",
    skip_log_dir: str | None = None,
) -> tuple[ProcessorDataset, ProcessorCollator]:
    """(dataset, collator) for a transformers image-text-to-text model's processor
    (build_supervised_data with `processor`)."""
    dataset = load_processor_dataset(
        data_path=data_args.data_path,
        processor=processor,
        version=version,
        model_max_length=model_max_length,
        image_folder=getattr(data_args, "image_folder", None),
        dataset_text_field=getattr(data_args, "dataset_text_field", None),
        dataset_image_field=getattr(data_args, "dataset_image_field", None),
        skip_bad_records=getattr(data_args, "skip_bad_records", False),
        skip_log_dir=skip_log_dir,
        max_image_pixels=getattr(data_args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        build_workers=getattr(data_args, "preprocessing_num_workers", None) or available_cpus(),
    )
    if len(dataset) == 0:
        raise ValueError(f"no trainable sample in {data_args.data_path}: {dataset.summary.line()}")
    collator = ProcessorCollator(
        pad_token_id_of(processor.tokenizer), batching_rules(dataset.media), padding_side
    )
    return dataset, collator
