"""Golden masks: for every template and tokenizer family, exactly the answers are supervised."""

import pytest
from transformers import AutoTokenizer

from llava.compat import has_slow_tokenizers
from llava.constants import IGNORE_INDEX, IMAGE_END_TOKEN, IMAGE_PLACEHOLDER_ID, IMAGE_START_TOKEN
from llava.conversation import Turn, get_template, render_text
from llava.data.tokenize import (
    KEPT,
    NO_SUPERVISION,
    SHORTENED,
    TOO_LONG,
    ConversationTokenizer,
    fit,
)

NUM_IMAGE_TOKENS = 5
# (family, use_fast): sentencepiece Llama with legacy=False and legacy=True (slow too, on the
# line that still has slow tokenizers); byte-level BPE in the Qwen2 and the Llama-3 style.
VARIANTS = [
    ("sp", True),
    ("sp_legacy", True),
    ("bpe_qwen2", True),
    ("bpe_llama3", True),
] + ([("sp", False), ("sp_legacy", False)] if has_slow_tokenizers() else [])
VARIANT_IDS = [f"{family}-{'fast' if fast else 'slow'}" for family, fast in VARIANTS]
EOS = {"sp": "</s>", "sp_legacy": "</s>", "bpe_qwen2": "<|im_end|>", "bpe_llama3": "<|eot_id|>"}
# The end token each template puts after an answer (auto: the tokenizer's own template).
END = {
    "plain": lambda family: "\n",
    "vicuna_v1": lambda family: EOS[family],
    "llava_llama_2": lambda family: EOS[family],
    "mistral_instruct": lambda family: EOS[family],
    "llama_3": lambda family: "<|eot_id|>",
    "chatml": lambda family: "<|im_end|>",
    "gemma": lambda family: "<end_of_turn>",
    "auto": lambda family: EOS[family],
}
ANSWERS = ["A cat sitting on a red mat.", "The mat is red {really}, 42 of them.\nYes!"]
TURNS = [
    Turn("user", "<image>\nWhat is in the picture?"),
    Turn("assistant", ANSWERS[0]),
    Turn("user", "What colour is the mat?"),
    Turn("assistant", ANSWERS[1]),
]


@pytest.fixture(scope="module")
def tokenizers(tokenizer_paths):
    return {
        (family, fast): AutoTokenizer.from_pretrained(tokenizer_paths[family], use_fast=fast)
        for family, fast in VARIANTS
    }


def supervised_spans(encoded) -> list[list[int]]:
    """Supervised ids, one list per answer (split at runs and at turn ends)."""
    spans, current = [], []
    for position, label in enumerate(encoded.labels):
        if position in encoded.turn_ends and current:
            spans.append(current)
            current = []
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("template", list(END))
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_only_answers_and_their_end_token_are_supervised(tokenizers, template, variant):
    tokenizer = tokenizers[variant]
    turns = TURNS if template != "plain" else [TURNS[0], TURNS[1]]
    encoded = ConversationTokenizer(tokenizer, template, NUM_IMAGE_TOKENS).encode(turns)
    answers = [turn.text for turn in turns if turn.role == "assistant"]
    end = END[template](variant[0])
    decoded = [decode(tokenizer, span).lstrip(" ") for span in supervised_spans(encoded)]
    assert decoded == [answer + end for answer in answers]
    # labels equal input_ids where supervised, and the ids themselves are real tokens
    for token, label in zip(encoded.input_ids, encoded.labels):
        assert label in (IGNORE_INDEX, token)
    assert len(encoded.turn_ends) == len(answers)


@pytest.mark.parametrize("template", list(END))
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_image_becomes_a_run_of_ignored_placeholders(tokenizers, template, variant):
    encoded = ConversationTokenizer(tokenizers[variant], template, NUM_IMAGE_TOKENS).encode(TURNS)
    positions = [i for i, token in enumerate(encoded.input_ids) if token == IMAGE_PLACEHOLDER_ID]
    assert len(positions) == NUM_IMAGE_TOKENS
    assert positions == list(range(positions[0], positions[0] + NUM_IMAGE_TOKENS))
    assert encoded.image_spans == [(positions[0], positions[-1] + 1)]
    assert all(encoded.labels[i] == IGNORE_INDEX for i in positions)


@pytest.mark.parametrize("template", list(END))
def test_ids_do_not_depend_on_legacy_mode_or_slow_fast(tokenizers, template):
    ids = {
        variant: ConversationTokenizer(tokenizers[variant], template, 3).encode(TURNS).input_ids
        for variant in VARIANTS
        if variant[0].startswith("sp")
    }
    assert len({tuple(v) for v in ids.values()}) == 1


@pytest.mark.parametrize("template", list(END))
@pytest.mark.parametrize("family", ["sp", "bpe_qwen2", "bpe_llama3"])
def test_ids_equal_whole_text_tokenization_for_non_legacy_tokenizers(tokenizers, template, family):
    """Per-turn concatenation is the tokenization of the whole rendered text."""
    tokenizer = tokenizers[(family, True)]
    turns = [Turn(t.role, t.text.replace("<image>\n", "")) for t in TURNS]
    converter = ConversationTokenizer(tokenizer, template, 3)
    text = render_text(converter.template, turns, tokenizer)
    starts_with_bos = tokenizer.bos_token and text.startswith(tokenizer.bos_token)
    expected = tokenizer(text, add_special_tokens=not starts_with_bos)["input_ids"]
    assert converter.encode(turns).input_ids == expected


def test_legacy_whole_text_tokenization_differs_but_labels_stay_right(tokenizers):
    """The bug that zeroed LLaVA's samples: legacy=True adds '▁' after </s> in a whole text."""
    tokenizer = tokenizers[("sp_legacy", True)]
    converter = ConversationTokenizer(tokenizer, "v1", 3)
    turns = [Turn(t.role, t.text.replace("<image>\n", "")) for t in TURNS]
    whole = tokenizer(render_text(converter.template, turns, tokenizer))["input_ids"]
    assert converter.encode(turns).input_ids != whole


def test_mm_use_im_start_end_wraps_placeholders(tokenizer_paths):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_paths["sp"])
    tokenizer.add_tokens([IMAGE_START_TOKEN, IMAGE_END_TOKEN], special_tokens=True)
    start, end = tokenizer.convert_tokens_to_ids([IMAGE_START_TOKEN, IMAGE_END_TOKEN])
    encoded = ConversationTokenizer(tokenizer, "v1", 4, mm_use_im_start_end=True).encode(TURNS)
    first = encoded.input_ids.index(start)
    assert encoded.input_ids[first : first + 6] == [start] + [IMAGE_PLACEHOLDER_ID] * 4 + [end]
    assert encoded.image_spans == [(first, first + 6)]
    with pytest.raises(ValueError, match="im_start"):
        ConversationTokenizer(AutoTokenizer.from_pretrained(tokenizer_paths["sp"]), "v1", 4, True)


def test_generation_prompt_is_the_prefix_before_the_answer(tokenizers):
    tokenizer = tokenizers[("bpe_qwen2", True)]
    converter = ConversationTokenizer(tokenizer, "chatml", 3)
    full = converter.encode(TURNS[:2])
    prompt = converter.encode_prompt(TURNS[:1])
    first_supervised = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert prompt == full.input_ids[:first_supervised]


# -- truncation ---------------------------------------------------------------------------------
def test_fit_keeps_short_conversations(tokenizers):
    encoded = ConversationTokenizer(tokenizers[("sp", True)], "v1", 8).encode(TURNS)
    sample, outcome = fit(encoded, len(encoded.input_ids))
    assert outcome == KEPT and sample.input_ids == encoded.input_ids and sample.num_images == 1


def test_fit_cuts_at_a_turn_boundary_never_inside_an_image(tokenizers):
    """Second image in the second turn: a cut before its end drops it whole."""
    turns = [
        Turn("user", "<image>\nWhat is it?"),
        Turn("assistant", "A cat."),
        Turn("user", "And this one?\n<image>"),
        Turn("assistant", "A dog."),
    ]
    encoded = ConversationTokenizer(tokenizers[("sp", True)], "v1", 20).encode(turns)
    (_, first_end), (second_start, _) = encoded.image_spans
    assert first_end < encoded.turn_ends[0] < second_start
    for max_length in range(encoded.turn_ends[0], len(encoded.input_ids)):
        sample, outcome = fit(encoded, max_length)
        assert outcome == SHORTENED
        assert len(sample.input_ids) == encoded.turn_ends[0] <= max_length
        assert sample.num_images == 1
        placeholders = sample.input_ids.count(IMAGE_PLACEHOLDER_ID)
        assert placeholders == 20  # one whole image, never a part of the second
    for max_length in range(first_end - 3, encoded.turn_ends[0]):
        assert fit(encoded, max_length) == (None, TOO_LONG)


def test_fit_drops_when_the_first_answer_does_not_fit(tokenizers):
    encoded = ConversationTokenizer(tokenizers[("sp", True)], "v1", 50).encode(TURNS)
    sample, outcome = fit(encoded, encoded.turn_ends[0] - 1)
    assert sample is None and outcome == TOO_LONG


def test_fit_drops_conversations_with_nothing_supervised(tokenizers):
    encoded = ConversationTokenizer(tokenizers[("sp", True)], "v1", 4).encode(TURNS[:1])
    assert fit(encoded, 10_000) == (None, NO_SUPERVISION)


def test_vicuna_sample_layout(tokenizers):
    """A whole sample: BOS, prompt, image, prompt, answer, EOS, in that order."""
    tokenizer = tokenizers[("sp", True)]
    encoded = ConversationTokenizer(tokenizer, get_template("v1"), 2).encode(TURNS[:2])
    ids = encoded.input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    start = ids.index(IMAGE_PLACEHOLDER_ID)
    first_supervised = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert decode(tokenizer, ids[1:start]).endswith("questions. USER: ")
    after_image = decode(tokenizer, ids[start + 2 : first_supervised])
    assert after_image.strip(" ") == "\nWhat is in the picture? ASSISTANT:"
    # text after an image starts fresh, with the dummy prefix, as in LLaVA: [-200, 29871, 13, ...]
    assert tokenizer.convert_ids_to_tokens(ids[start + 2 : start + 4]) == ["▁", "<0x0A>"]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_conversations_encoded_together_equal_each_alone_and_repeats_are_encoded_once(
    tokenizers, variant
):
    """A block repeats chunks (the system prompt, short answers): each distinct chunk goes to
    the tokenizer once, and every conversation gets the ids it gets alone."""
    conversation = ConversationTokenizer(tokenizers[variant], "vicuna_v1", NUM_IMAGE_TOKENS)
    short = [Turn("user", "<image>\nIs it red?"), Turn("assistant", "Yes")]
    block = [TURNS, short, TURNS, short, short[:1] + [Turn("assistant", "No")]]
    sent = []
    encode_raw = conversation.encoder.encode_raw
    conversation.encoder.encode_raw = lambda texts: sent.append(list(texts)) or encode_raw(texts)
    together = conversation.encode_many(block)
    assert len(sent) == 1 and len(sent[0]) == len(set(sent[0]))
    for turns, encoded in zip(block, together):
        assert encoded == conversation.encode(turns)
