"""Conversation -> input_ids and labels, built segment by segment so the labels are right by design.

Each rendered segment (prompt or answer) is encoded on its own and the ids are concatenated;
a token is supervised exactly when its segment is. There is no re-tokenizing of the whole
prompt and counting, so no "tokenization mismatch". Three rules make per-segment encoding
match what the tokenizer does inside a longer text, whatever its legacy mode:

- special tokens (`</s>`, `<|im_end|>`, ...) are split out and mapped to their ids directly;
- text at the start of the sequence or right after an image is encoded as a fresh text (with
  sentencepiece's dummy prefix, as LLaVA does for the text after `<image>`);
- any other text is encoded behind an anchor (a newline) whose ids are then removed, so no
  dummy prefix or prefix space is invented in the middle of a sequence.

Each `<image>` becomes `num_image_tokens` copies of IMAGE_PLACEHOLDER_ID (optionally between
<im_start>/<im_end>) before truncation, so lengths are the model's true lengths.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llava.constants import (
    IGNORE_INDEX,
    IMAGE_END_TOKEN,
    IMAGE_PLACEHOLDER_ID,
    IMAGE_START_TOKEN,
    IMAGE_TOKEN,
)
from llava.conversation import ChatTemplate, Segment, Turn, get_template, render

# Texts put before a mid-sequence chunk and removed again; the first whose ids stay a clean
# prefix is used (a newline merges with a following newline in byte-level BPE, a letter not).
ANCHORS = ("\n", "a", ".")

# (kind, value, supervised): kind is text (value: str), special (value: id), image or end.
Piece = tuple[str, Any, bool]

# Outcomes of fitting a conversation into model_max_length.
KEPT, SHORTENED, TOO_LONG, NO_SUPERVISION = "kept", "shortened", "too_long", "no_supervision"


@dataclass(frozen=True)
class EncodedConversation:
    """A whole conversation's ids before truncation.

    turn_ends: positions just after each supervised segment (where a cut keeps whole turns).
    image_spans: [start, end) of each image's placeholders, markers included, in order.
    """

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]
    image_spans: list[tuple[int, int]]


@dataclass(frozen=True)
class TokenizedSample:
    """What is trained on: ids, labels, and how many of the record's images it still holds."""

    input_ids: list[int]
    labels: list[int]
    num_images: int


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text (BOS for Llama, none for Qwen)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def starts_with_bos(tokenizer: Any, text: str) -> bool:
    """Whether rendered text already begins with the tokenizer's BOS; then the tokenizer's own
    leading ids are not added, so the sequence never holds two (auto templates often write it)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


class TextEncoder:
    """Encodes text chunks as the tokenizer would inside a longer sequence."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        specials = dict(getattr(tokenizer, "added_tokens_encoder", {}))
        for token in tokenizer.all_special_tokens:
            specials.setdefault(token, tokenizer.convert_tokens_to_ids(token))
        self.special_ids = {token: i for token, i in specials.items() if token and i is not None}
        tokens = sorted(self.special_ids, key=len, reverse=True)
        self.special_pattern = (
            re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None
        )
        self.anchor_ids = {anchor: self.encode_raw([anchor])[0] for anchor in ANCHORS}
        self.prefix_ids = leading_special_ids(tokenizer)

    def encode_raw(self, texts: list[str]) -> list[list[int]]:
        """Ids of texts without special tokens; a fast tokenizer's backend is called directly
        (what its __call__ does, without building offsets and masks)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        if backend.padding is not None or backend.truncation is not None:
            # a processor's call leaves them set (Gemma 4's pads by default); the tokenizer's
            # own __call__ sets both again each time, so clearing them here changes nothing else
            backend.no_padding()
            backend.no_truncation()
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def split_special(self, text: str) -> list[tuple[str, bool]]:
        """(piece, is_special_token) pieces of a text, empty pieces dropped. The pattern's one
        group puts each special token at an odd place of the split."""
        if self.special_pattern is None:
            return [(text, False)] if text else []
        pieces = self.special_pattern.split(text)
        return [(piece, k % 2 == 1) for k, piece in enumerate(pieces) if piece]

    def encode_behind_anchor(self, text: str) -> list[int]:
        for anchor, anchor_ids in self.anchor_ids.items():
            ids = self.encode_raw([anchor + text])[0]
            if ids[: len(anchor_ids)] == anchor_ids:
                return ids[len(anchor_ids) :]
        raise ValueError(f"cannot encode {text!r} in mid-sequence with this tokenizer")

    def encode_chunks(self, chunks: list[tuple[str, bool]]) -> list[list[int]]:
        """Ids of plain-text chunks; `fresh` chunks start a text, the others continue one.

        Equal chunks are encoded once (a block's records repeat the system prompt and short
        answers); each gets its own list."""
        distinct = list(dict.fromkeys(chunks))
        anchor, anchor_ids = ANCHORS[0], self.anchor_ids[ANCHORS[0]]
        texts = [text if fresh else anchor + text for text, fresh in distinct]
        found = {}
        for (text, fresh), ids in zip(distinct, self.encode_raw(texts)):
            if fresh:
                found[text, fresh] = ids
            elif ids[: len(anchor_ids)] == anchor_ids:
                found[text, fresh] = ids[len(anchor_ids) :]
            else:
                found[text, fresh] = self.encode_behind_anchor(text)
        if len(distinct) == len(chunks):
            return [found[chunk] for chunk in chunks]
        return [list(found[chunk]) for chunk in chunks]


class ConversationTokenizer:
    """Turns -> ids and labels for one template, tokenizer and vision tower."""

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate | str,
        num_image_tokens: int,
        mm_use_im_start_end: bool = False,
        fresh_after_image: bool = True,
    ):
        """`fresh_after_image`: text after an image starts a fresh text (LLaVA's composed
        models); off where an image's ids end in a special token inside one tokenized text
        (a processor's expansion), so the text continues as after any special token."""
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.num_image_tokens = num_image_tokens
        self.fresh_after_image = fresh_after_image
        self.encoder = TextEncoder(tokenizer)
        # the ids before a text that does not begin with BOS (a processor may write its own)
        self.leading_ids = self.encoder.prefix_ids
        self.markers = None
        if mm_use_im_start_end:
            self.markers = (
                marker_id(tokenizer, IMAGE_START_TOKEN),
                marker_id(tokenizer, IMAGE_END_TOKEN),
            )
        self.image_ids = self.image_ids_for(num_image_tokens)

    def image_ids_for(self, num_image_tokens: int) -> list[int]:
        """The ids of an image of `num_image_tokens` tokens: its placeholders, between the
        <im_start> and <im_end> markers under --mm_use_im_start_end."""
        ids = [IMAGE_PLACEHOLDER_ID] * num_image_tokens
        if self.markers is None:
            return ids
        start, end = self.markers
        return [start, *ids, end]

    def pieces(self, segments: list[Segment]) -> list[Piece]:
        """(kind, value, supervised) with kind text | special | image | end (of a segment)."""
        pieces: list[Piece] = []
        for segment in segments:
            for k, part in enumerate(segment.text.split(IMAGE_TOKEN)):
                if k > 0:
                    pieces.append(("image", 0, segment.supervised))
                for text, special in self.encoder.split_special(part):
                    value = self.encoder.special_ids[text] if special else text
                    pieces.append(("special" if special else "text", value, segment.supervised))
            pieces.append(("end", 0, segment.supervised))
        return pieces

    def plan(
        self, segments: list[Segment]
    ) -> tuple[list[int], list[Piece], list[tuple[str, bool]]]:
        """(leading special ids, pieces, text chunks to encode with their `fresh` flag)."""
        pieces = self.pieces(segments)
        prefix = self.leading_ids
        if segments and starts_with_bos(self.tokenizer, segments[0].text):
            prefix = []  # the template already writes BOS (auto templates often do)
        chunks, fresh = [], True  # the first text starts the sequence
        for kind, value, _ in pieces:
            if kind == "text":
                chunks.append((value, fresh))
            if kind != "end":
                fresh = kind == "image" and self.fresh_after_image
        return prefix, pieces, chunks

    def assemble(
        self,
        prefix: list[int],
        pieces: list[Piece],
        encoded: Iterator[list[int]],
        image_ids: Sequence[Sequence[int]] | None = None,
    ) -> EncodedConversation:
        """Concatenate the pieces' ids; labels copy the ids of supervised pieces.

        `image_ids`: the ids of each image in order, where they differ per image (a processor's
        expansion depends on the image's size); None: every image is `self.image_ids`."""
        input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        turn_ends, image_spans = [], []
        images = iter(image_ids) if image_ids is not None else None
        for kind, value, supervised in pieces:
            if kind == "end":
                if supervised:
                    turn_ends.append(len(input_ids))
                continue
            if kind == "image":
                ids = list(next(images)) if images is not None else self.image_ids
                image_spans.append((len(input_ids), len(input_ids) + len(ids)))
                supervised = False
            else:
                ids = next(encoded) if kind == "text" else [value]
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        return EncodedConversation(input_ids, labels, turn_ends, image_spans)

    def encode_segments(
        self,
        segments_list: list[list[Segment]],
        image_ids_list: Sequence[Sequence[Sequence[int]] | None] | None = None,
    ) -> list[EncodedConversation]:
        """Several conversations at once: one batched tokenizer call for all their text.

        `image_ids_list`: per conversation, the ids of each of its images (see `assemble`)."""
        plans = [self.plan(segments) for segments in segments_list]
        chunks = [chunk for _, _, plan_chunks in plans for chunk in plan_chunks]
        encoded = iter(self.encoder.encode_chunks(chunks))
        image_ids_list = image_ids_list or [None] * len(plans)
        return [
            self.assemble(prefix, pieces, encoded, image_ids)
            for (prefix, pieces, _), image_ids in zip(plans, image_ids_list)
        ]

    def render(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        return render(self.template, list(turns), self.tokenizer, add_generation_prompt)

    def encode_many(
        self,
        turns_list: list[list[Turn]],
        image_ids_list: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> list[EncodedConversation | ValueError]:
        """Encode many conversations (fast); one that cannot be rendered gives its error.

        `image_ids_list`: per conversation, each image's ids (where they depend on the image's
        size, as AnyRes's do); None: every image is `self.image_ids`."""
        rendered: list[list[Segment] | ValueError] = []
        for turns in turns_list:
            try:
                rendered.append(self.render(turns))
            except ValueError as error:
                rendered.append(error)
        image_ids_list = image_ids_list or [None] * len(rendered)
        good = [
            (segments, image_ids)
            for segments, image_ids in zip(rendered, image_ids_list)
            if not isinstance(segments, ValueError)
        ]
        encoded = iter(self.encode_segments([g[0] for g in good], [g[1] for g in good]))
        return [item if isinstance(item, ValueError) else next(encoded) for item in rendered]

    def encode(self, turns: list[Turn]) -> EncodedConversation:
        """The whole conversation, untruncated."""
        return self.encode_segments([self.render(turns)])[0]

    def encode_prompt(
        self, turns: list[Turn], image_ids: Sequence[Sequence[int]] | None = None
    ) -> list[int]:
        """Ids of a generation prompt: the turns so far, ending where the answer starts
        (`image_ids`: each image's, where they depend on its size)."""
        segments = self.render(turns, add_generation_prompt=True)
        unsupervised = [Segment(segment.text, False) for segment in segments]
        return self.encode_segments([unsupervised], [image_ids])[0].input_ids

    def __call__(self, turns: list[Turn], max_length: int) -> tuple[TokenizedSample | None, str]:
        """The sample to train on (or None) and the outcome: kept, shortened, too_long, ..."""
        return fit(self.encode(turns), max_length)


def marker_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"--mm_use_im_start_end needs {token!r} in the tokenizer's vocabulary")
    return token_id


def fit(encoded: EncodedConversation, max_length: int) -> tuple[TokenizedSample | None, str]:
    """Fit into `max_length` by cutting after the last whole answer that fits.

    A cut is only made at a turn boundary, so an image's placeholders are never split: images
    after the cut are dropped with their turns. A conversation whose first answer does not
    fit, or that has no supervised token at all, gives None.
    """
    cut, outcome = len(encoded.input_ids), KEPT
    if cut > max_length:
        fitting = [end for end in encoded.turn_ends if end <= max_length]
        if not fitting:
            return None, TOO_LONG
        cut, outcome = fitting[-1], SHORTENED
    labels = encoded.labels[:cut]
    if labels.count(IGNORE_INDEX) == len(labels):
        return None, NO_SUPERVISION
    if any(start < cut < end for start, end in encoded.image_spans):
        raise AssertionError("a cut inside an image's placeholders")  # impossible by design
    num_images = sum(1 for _, end in encoded.image_spans if end <= cut)
    return TokenizedSample(encoded.input_ids[:cut], labels, num_images), outcome
