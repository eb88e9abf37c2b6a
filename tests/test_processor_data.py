"""The processor media encoder against each tiny VLM family's own processor and model.

Golden tests per family: our ids equal the processor's chat-template ids, labels are exactly
the answers and their end-of-turn tokens, construction-time lengths are the loaded lengths,
truncation keeps whole turns and the kept images' pixels, and a mixed batch runs the model.
"""

import inspect
import json
import os
import pickle
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava.compat import TRANSFORMERS_5
from llava.constants import IGNORE_INDEX
from llava.conversation import ASSISTANT, USER, Turn, content_parts
from llava.data.dataset import build_supervised_data, split_for_validation
from llava.data.formats import BadRecordError, Record
from llava.data.processor_collator import (
    IMAGES,
    PER_SAMPLE,
    SEQUENCE,
    ProcessorCollator,
    batching_rules,
    pad_and_stack,
)
from llava.data.processor_media import (
    ProcessorDataset,
    ProcessorMedia,
    PromptSuffixDataset,
    find_placeholder,
    is_prompt_suffix,
)
from llava.model.image_text_to_text import gathered_loss, loss_inputs
from tests.fixtures.tiny_vlms import PROMPT_FAMILIES, VLM_FAMILIES, save_tiny_vlm, tiny_image

# (width, height): different token counts on Qwen2-VL, different tiles on Idefics3
SIZES = ((40, 70), (90, 30))
ANSWERS = ("A cat is on the table.", "It is a red car.")
# Turns as the data has them, and the same conversation as a VLM's messages, written by hand.
TURNS = (
    Turn(USER, "<image>\nWhat is in the picture?"),
    Turn(ASSISTANT, ANSWERS[0]),
    Turn(USER, "And what is in <image> this one?"),
    Turn(ASSISTANT, ANSWERS[1]),
)
MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
    },
    {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[0]}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "And what is in "},
            {"type": "image"},
            {"type": "text", "text": " this one?"},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[1]}]},
]
# The token each family's template ends an answer with.
END_OF_TURN = {
    "llava": "</s>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "qwen2_vl": "<|im_end|>",
    "qwen3_vl": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "gemma4": "<turn|>",
}

families = pytest.mark.parametrize("family", VLM_FAMILIES)


@pytest.fixture(scope="module")
def processors(tiny_vlm_paths) -> dict:
    return {family: AutoProcessor.from_pretrained(path) for family, path in tiny_vlm_paths.items()}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, size in enumerate(SIZES):
        paths.append(str(folder / f"{seed}.png"))
        tiny_image(size, seed).save(paths[-1])
    return paths


def with_images(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """The messages with each image part carrying its image, in order."""
    remaining = iter(images)
    return [
        {
            **message,
            "content": [
                {"type": "image", "image": next(remaining)} if part["type"] == "image" else part
                for part in message["content"]
            ],
        }
        for message in messages
    ]


def golden(processor, messages: list[dict], images: list[Image.Image]) -> dict:
    """The processor's own inputs for the conversation (its apply_chat_template)."""
    return processor.apply_chat_template(
        with_images(messages, images), tokenize=True, return_dict=True, return_tensors="pt"
    )


def opened(paths: list[str]) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in paths]


def make_dataset(processor, records, max_length: int = 2048, **kwargs) -> ProcessorDataset:
    return ProcessorDataset(records, processor, "auto", max_length, **kwargs)


def supervised_texts(tokenizer, sample: dict) -> list[str]:
    """The decoded runs of supervised tokens, in order."""
    runs, current = [], []
    for token_id, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token_id
            current.append(token_id)
    runs += [current] if current else []
    return [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in runs]


# -- placing images ---------------------------------------------------------------------------
def test_content_parts_split_at_tags_and_drop_the_tag_newline():
    assert content_parts("<image>\nWhat?") == [{"type": "image"}, {"type": "text", "text": "What?"}]
    assert content_parts("A <image> B\n<image>") == [
        {"type": "text", "text": "A "},
        {"type": "image"},
        {"type": "text", "text": " B"},
        {"type": "image"},
    ]
    assert content_parts("no image") == [{"type": "text", "text": "no image"}]


@families
def test_blank_image_expansion_equals_the_real_images(family, processors):
    """Ids learnt from a blank image of a size are those of real images of that size."""
    media = ProcessorMedia(processors[family])
    for seed, size in enumerate([*SIZES, (200, 100), (33, 33)]):
        text = media.probe_prefix + media.placeholder
        real = media(text, [tiny_image(size, seed)], add_special_tokens=False)
        expansion = media.expansion(size)
        encoded = media.encoder.encode_raw([expansion.lead, expansion.trail])
        ids = media.after_prefix(real["input_ids"][0].tolist())
        assert ids == [*encoded[0], *expansion.ids, *encoded[1]]


@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_a_prompt_suffix_processor_is_not_placed_in_a_conversation(family, processors, image_files):
    """PaliGemma's processor has no chat template (as its real checkpoints): it cannot place
    images in a conversation, and the error names it and where it does train."""
    processor = processors[family]
    record = Record(TURNS, tuple(image_files), "mem", 0)
    name = type(processor).__name__
    with pytest.raises(ValueError, match=f"{name} has no chat_template .*PromptSuffixDataset"):
        ProcessorDataset([record], processor, "auto", 2048)
    with pytest.raises(ValueError, match="--version auto, not vicuna_v1"):
        PromptSuffixDataset([record], processor, "vicuna_v1", 2048)


def test_a_processor_without_chat_template_takes_bare_prompts():
    """Any processor without a chat template takes a bare prompt (the answer learnt after it),
    whether or not it takes a suffix; it cannot place images in a conversation."""

    class BarePromptProcessor:  # a stand-in: no such processor is built here
        chat_template = None
        tokenizer = SimpleNamespace(chat_template=None)

        def __call__(self, text=None, images=None, **kwargs):
            raise AssertionError("never called")

    assert is_prompt_suffix(BarePromptProcessor())
    with pytest.raises(ValueError, match="BarePromptProcessor has no chat_template .*single-turn"):
        find_placeholder(BarePromptProcessor(), None)


# -- golden tests against each family's processor ----------------------------------------------
@families
def test_ids_equal_the_processors_chat_template(family, processors, image_files):
    processor = processors[family]
    dataset = make_dataset(processor, [Record(TURNS, tuple(image_files), "mem", 0)])
    sample = dataset[0]
    theirs = golden(processor, MESSAGES, opened(image_files))["input_ids"][0].tolist()
    ours = sample["input_ids"].tolist()
    # the template's text after the last end-of-turn token (a newline) is not trained on
    assert theirs[: len(ours)] == ours
    assert processor.tokenizer.decode(theirs[len(ours) :]).strip() == ""
    assert dataset.lengths == [len(ours)]  # the length known before decoding any image
    assert dataset.modalities == ["image"]


@families
def test_labels_are_the_answers_and_their_end_tokens(family, processors, image_files):
    processor = processors[family]
    sample = make_dataset(processor, [Record(TURNS, tuple(image_files), "mem", 0)])[0]
    end = END_OF_TURN.get(family, processor.tokenizer.eos_token)
    texts = supervised_texts(processor.tokenizer, sample)
    assert [text.lstrip(" ") for text in texts] == [answer + end for answer in ANSWERS]


@families
def test_lengths_at_construction_are_the_loaded_lengths(family, processors, image_files):
    processor = processors[family]
    records = [
        Record(TURNS, tuple(image_files), "mem", 0),
        Record(TURNS, tuple(reversed(image_files)), "mem", 1),
        Record(TURNS[:2], tuple(image_files[1:]), "mem", 2),
        Record((Turn(USER, "Hi?"), Turn(ASSISTANT, "Hello.")), (), "mem", 3),
    ]
    dataset = make_dataset(processor, records)
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert dataset.modalities == ["image", "image", "image", "text"]


@families
def test_truncation_keeps_whole_turns_and_the_kept_images(family, processors, image_files):
    processor = processors[family]
    record = Record(TURNS, tuple(image_files), "mem", 0)
    full = make_dataset(processor, [record]).lengths[0]
    first_turn = golden(processor, MESSAGES[:2], opened(image_files[:1]))
    cut = len(first_turn["input_ids"][0]) + 1  # room for the first turn, not the second
    assert cut < full
    dataset = make_dataset(processor, [record], max_length=cut)
    sample = dataset[0]
    assert dataset.summary.shortened == 1
    end = END_OF_TURN.get(family, processor.tokenizer.eos_token)
    texts = supervised_texts(processor.tokenizer, sample)
    assert [text.lstrip(" ") for text in texts] == [ANSWERS[0] + end]
    theirs = first_turn["input_ids"][0].tolist()
    assert theirs[: len(sample["input_ids"])] == sample["input_ids"].tolist()
    for key, value in first_turn.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if value.ndim >= 2 and value.shape[:2] == first_turn["input_ids"].shape:  # per token
            value = value[:, : len(sample["input_ids"])]
        torch.testing.assert_close(sample[key], value, msg=f"{family} {key}")

    too_short = make_dataset(processor, [record, record], max_length=8, skip_bad_records=True)
    assert len(too_short) == 0 and too_short.summary.dropped_too_long == 2


# -- collation and the model's forward ---------------------------------------------------------
@families
def test_mixed_batch_runs_the_model(family, processors, image_files, tiny_vlm_paths):
    processor = processors[family]
    records = [
        Record(TURNS, tuple(image_files), "mem", 0),
        Record(TURNS[:2], tuple(image_files[1:]), "mem", 1),
        Record((Turn(USER, "Hi?"), Turn(ASSISTANT, "Hello.")), (), "mem", 2),
    ]
    dataset = make_dataset(processor, records)
    rules = batching_rules(dataset.media)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_paths[family]).eval()
    for padding_side in ("right", "left"):
        collator = ProcessorCollator(processor.tokenizer.pad_token_id, rules, padding_side)
        batch = collator([dataset[0], dataset[1], dataset[2]])
        with torch.no_grad():
            loss = model(**batch).loss
        assert torch.isfinite(loss), (family, padding_side)
    text_only = collator([dataset[2], dataset[2]])
    assert set(text_only) - {"input_ids", "labels", "attention_mask"} <= {
        key for key, rule in rules.items() if rule == SEQUENCE
    }
    with torch.no_grad():
        assert torch.isfinite(model(**text_only).loss)


@families
def test_batched_sample_gives_the_loss_of_the_sample_alone(
    family, processors, image_files, tiny_vlm_paths
):
    """Padding and image batching change nothing: the mixed batch's per-sample losses are the
    losses of each sample alone."""
    processor = processors[family]
    records = [
        Record(TURNS, tuple(image_files), "mem", 0),
        Record((Turn(USER, "Hi?"), Turn(ASSISTANT, "Hello.")), (), "mem", 1),
    ]
    dataset = make_dataset(processor, records)
    collator = ProcessorCollator(processor.tokenizer.pad_token_id, batching_rules(dataset.media))
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_paths[family]).eval()
    with torch.no_grad():
        alone = model(**collator([dataset[0]])).logits[0]
        together = model(**collator([dataset[0], dataset[1]])).logits[0]
    torch.testing.assert_close(together[: len(alone)], alone, atol=1e-4, rtol=1e-4)


def test_pad_and_stack_pads_every_dim_and_the_sequence_on_its_side():
    a, b = torch.ones(1, 2, 3), torch.full((1, 1, 4), 2.0)
    stacked = pad_and_stack([a, None, b], None, "right")
    assert stacked.shape == (3, 2, 4) and stacked[1].abs().sum() == 0
    assert stacked[2, 0].tolist() == [2, 2, 2, 2] and stacked[2, 1].tolist() == [0, 0, 0, 0]
    left = pad_and_stack([torch.ones(1, 2), torch.ones(1, 3)], 4, "left")
    assert left.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert {IMAGES, PER_SAMPLE, SEQUENCE} == {"images", "per_sample", "sequence"}


# -- the training entry --------------------------------------------------------------------------
def write_data(folder, image_files: list[str], rows_extra: list[dict] = ()) -> SimpleNamespace:
    rows = [
        {
            "id": "two",
            "image": [os.path.basename(p) for p in image_files],
            "conversations": [
                {"from": "human", "value": TURNS[0].text},
                {"from": "gpt", "value": ANSWERS[0]},
                {"from": "human", "value": TURNS[2].text},
                {"from": "gpt", "value": ANSWERS[1]},
            ],
        },
        {
            "id": "one",
            "image": os.path.basename(image_files[1]),
            "conversations": [
                {"from": "human", "value": "What is this?\n<image>"},
                {"from": "gpt", "value": ANSWERS[0]},
            ],
        },
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "Hi?"},
                {"from": "gpt", "value": "Hello."},
            ],
        },
        *rows_extra,
    ]
    path = os.path.join(str(folder), "data.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return SimpleNamespace(
        data_path=path,
        image_folder=os.path.dirname(image_files[0]),
        skip_bad_records=True,
    )


@pytest.mark.parametrize("family", VLM_FAMILIES[:1] + VLM_FAMILIES[-1:])
def test_build_supervised_data_with_a_processor(family, processors, image_files, tmp_path, caplog):
    processor = processors[family]
    unreadable = tmp_path / "bad.png"
    unreadable.write_bytes(b"not a png")
    bad_rows = [
        {
            "id": "missing",
            "image": "nowhere.png",
            "conversations": [
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": "A."},
            ],
        },
        {
            "id": "unreadable",
            "image": str(unreadable),
            "conversations": [
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": "A."},
            ],
        },
    ]
    data_args = write_data(tmp_path, image_files, bad_rows)
    dataset, collator = build_supervised_data(
        tokenizer=processor.tokenizer, data_args=data_args, version="auto", processor=processor
    )
    assert isinstance(collator, ProcessorCollator)
    assert dataset.modalities == ["image", "image", "text"]
    assert dataset.summary.skipped_bad == 2 and dataset.summary.kept == 3
    assert (
        "5 records -> 3 samples (2 with images, 1 text-only); skipped 2 bad"
        in dataset.summary.line()
    )
    train, validation = split_for_validation(dataset, 34, seed=0)
    assert len(train) + len(validation) == 3
    assert train.lengths == [len(train[i]["input_ids"]) for i in range(len(train))]
    batch = collator([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape == (3, max(dataset.lengths))

    data_args.skip_bad_records = False
    with pytest.raises(BadRecordError, match="missing"):
        build_supervised_data(processor.tokenizer, data_args=data_args, processor=processor)


def test_a_processor_that_disagrees_is_a_bad_record_naming_it(processors, image_files):
    """A difference between the processor's ids and ours names the record and the position."""
    family = VLM_FAMILIES[0]
    dataset = make_dataset(
        processors[family], [Record(TURNS, tuple(image_files), "data.json", 7, "x")]
    )
    size = SIZES[0]
    expansion = dataset.media.expansion(size)
    dataset.media.expansions[size] = replace(expansion, ids=expansion.ids + expansion.ids[-1:])
    with pytest.raises(BadRecordError, match=r"data.json record 7 \(id x\).*differ.*position \d+"):
        dataset[0]


@pytest.mark.parametrize("family", [f for f in VLM_FAMILIES if f.startswith("qwen2")])
def test_a_named_template_places_the_processors_images(family, processors, image_files):
    """--version chatml on a Qwen-VL: the data's <image> tags become the processor's
    placeholder, and the processor agrees with the ids built turn by turn."""
    records = [Record(TURNS, tuple(image_files), "mem", 0)]
    dataset = ProcessorDataset(records, processors[family], "chatml", 2048)
    sample = dataset[0]  # checks the processor's ids against ours
    assert dataset.lengths == [len(sample["input_ids"])]
    assert sample["image_grid_thw"].shape == (2, 3)


def test_dataset_pickles_for_loader_workers(processors, image_files):
    family = VLM_FAMILIES[-1]
    dataset = make_dataset(processors[family], [Record(TURNS, tuple(image_files), "mem", 0)])
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy[0]["input_ids"].tolist() == dataset[0]["input_ids"].tolist()


# -- prompt + suffix processors (PaliGemma's, Fuyu's) ---------------------------------------------
prompt_families = pytest.mark.parametrize("family", PROMPT_FAMILIES)
QUESTION = "What is in the picture?"
# Images a prompt takes (Fuyu's processor writes one image run), and the batching rules of the
# processor's outputs beside input_ids and attention_mask.
PROMPT_IMAGES = {"paligemma": 2, "fuyu": 1}
PROMPT_RULES = {
    "paligemma": {"token_type_ids": SEQUENCE, "pixel_values": IMAGES},
    "fuyu": {"image_patches": IMAGES},
}


def processor_sample(processor, images: list[str], answer: str) -> dict[str, torch.Tensor]:
    """The family's own sample for QUESTION about `images` and `answer`: PaliGemma's processor
    writes it whole (`suffix=`); Fuyu's writes the prompt, ending in its beginning-of-answer
    token, and the answer's ids as its tokenizer writes that text, then EOS, follow."""
    if "suffix" in inspect.signature(processor.__call__).parameters:
        theirs = processor(
            text=[QUESTION], images=[opened(images)], suffix=[answer], return_tensors="pt"
        )
        return {key: value for key, value in theirs.items()}
    theirs = dict(processor(text=[QUESTION], images=[opened(images)], return_tensors="pt"))
    tokenizer = processor.tokenizer
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    answer_ids = torch.tensor([[*answer_ids, tokenizer.eos_token_id]])
    prompt = theirs["input_ids"]
    theirs["input_ids"] = torch.cat([prompt, answer_ids], dim=1)
    theirs["labels"] = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer_ids], dim=1)
    theirs["attention_mask"] = torch.ones_like(theirs["input_ids"])
    return theirs


def one_turn(images: tuple[str, ...], index: int = 0, answer: str = ANSWERS[0]) -> Record:
    return Record(
        (Turn(USER, "<image>\n" + QUESTION), Turn(ASSISTANT, answer)), images, "mem", index
    )


@prompt_families
def test_prompt_suffix_ids_and_labels_are_the_processors(family, processors, image_files):
    processor = processors[family]
    assert is_prompt_suffix(processor)
    dataset = load_prompt_suffix(processor, [one_turn(tuple(image_files[:1]))])
    sample = dataset[0]
    theirs = processor_sample(processor, image_files[:1], ANSWERS[0])
    assert sample["input_ids"].tolist() == theirs.pop("input_ids")[0].tolist()
    assert sample["labels"].tolist() == theirs.pop("labels")[0].tolist()
    del theirs["attention_mask"]  # the collator's
    assert set(sample) == {"input_ids", "labels", *theirs}
    for key, value in theirs.items():
        torch.testing.assert_close(sample[key], value)
    eos = processor.tokenizer.eos_token
    assert supervised_texts(processor.tokenizer, sample) == [ANSWERS[0] + eos]


def load_prompt_suffix(processor, records, max_length: int = 2048, **kwargs):
    dataset = PromptSuffixDataset(records, processor, "auto", max_length, **kwargs)
    assert isinstance(dataset, ProcessorDataset)
    return dataset


@prompt_families
def test_prompt_suffix_lengths_at_construction_are_the_loaded_lengths(
    family, processors, image_files
):
    records = [
        one_turn(tuple(image_files[:1]), 0),
        one_turn(tuple(image_files[1:]), 1, ANSWERS[1]),
        one_turn(tuple(image_files[: PROMPT_IMAGES[family]]), 2),
    ]
    dataset = load_prompt_suffix(processors[family], records)
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert len(set(dataset.lengths)) > 1  # the images' sizes count (Fuyu's)
    assert dataset.modalities == ["image"] * 3


@prompt_families
def test_a_record_with_more_images_than_a_prompt_takes_is_named(family, processors, image_files):
    """Fuyu's processor writes one image run a prompt: a two-image record is a bad record."""
    if PROMPT_IMAGES[family] > 1:
        pytest.skip(f"{family} takes several images a prompt")
    record = one_turn(tuple(image_files[:2]), 7)
    with pytest.raises(BadRecordError, match="mem record 7: .*2 images"):
        load_prompt_suffix(processors[family], [record])


@prompt_families
def test_prompt_suffix_takes_single_turn_records_only(family, processors, image_files):
    processor = processors[family]
    images = tuple(image_files)
    with pytest.raises(BadRecordError, match=r"mem record 0: a prompt\+suffix processor takes one"):
        load_prompt_suffix(processor, [Record(TURNS, images, "mem", 0)])
    system = Record(
        (Turn("system", "Be brief."), *one_turn(images[:1]).turns), images[:1], "mem", 1
    )
    no_answer = Record((Turn(USER, "<image>\nWhat?"),), images[:1], "mem", 2)
    empty = Record((Turn(USER, "<image>\nWhat?"), Turn(ASSISTANT, "")), images[:1], "mem", 3)
    text_only = Record((Turn(USER, "Hi?"), Turn(ASSISTANT, "Hello.")), (), "mem", 4)
    records = [Record(TURNS, images, "mem", 0), system, no_answer, empty, text_only]
    dataset = load_prompt_suffix(
        processor, [*records, one_turn(images[:1], 5)], skip_bad_records=True
    )
    assert len(dataset) == 1 and dataset.summary.skipped_bad == 5
    assert all("prompt+suffix processor takes one" in r for r in dataset.summary.reasons[:4])


@prompt_families
def test_prompt_suffix_longer_than_max_length_is_dropped(family, processors, image_files):
    record = one_turn(tuple(image_files[:1]))
    full = load_prompt_suffix(processors[family], [record]).lengths[0]
    dataset = load_prompt_suffix(processors[family], [record, record], max_length=full - 1)
    assert len(dataset) == 0 and dataset.summary.dropped_too_long == 2
    assert load_prompt_suffix(processors[family], [record], max_length=full).lengths == [full]


@prompt_families
def test_prompt_suffix_batch_loss_is_the_models_own(
    family, processors, image_files, tiny_vlm_paths
):
    """A collated batch (both padding sides) gives the model's own loss through the trainer's
    gathered loss (labels kept out of the forward, the prefix mask from token_type_ids)."""
    processor = processors[family]
    images = tuple(image_files[: PROMPT_IMAGES[family]])
    records = [one_turn(tuple(image_files[1:2]), 0), one_turn(images, 1, ANSWERS[1])]
    dataset = load_prompt_suffix(processor, records)
    rules = batching_rules(dataset.media)
    assert rules == PROMPT_RULES[family]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_paths[family]).eval()
    for padding_side in ("right", "left"):
        collator = ProcessorCollator(processor.tokenizer.pad_token_id, rules, padding_side)
        batch = collator([dataset[0], dataset[1]])
        with torch.no_grad():
            own = model(**batch).loss
            inputs = loss_inputs(model, batch)
            labels = inputs.pop("labels")
            ours = gathered_loss(model(**inputs), labels)
        assert torch.isfinite(own), padding_side
        torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(TRANSFORMERS_5, reason="4.x only")
def test_a_prompt_suffix_processor_is_refused_on_4x(tmp_path, image_files):
    """4.55's PaliGemma masks its prefix only when given labels (kept out of the forward)."""
    processor = AutoProcessor.from_pretrained(save_tiny_vlm("paligemma", str(tmp_path)))
    assert is_prompt_suffix(processor)
    with pytest.raises(ValueError, match="transformers 5.x only"):
        load_prompt_suffix(processor, [one_turn(tuple(image_files[:1]))])


@prompt_families
def test_build_supervised_data_with_a_prompt_suffix_processor(
    family, processors, image_files, tmp_path
):
    processor = processors[family]
    data_args = write_data(tmp_path, image_files)  # a two-turn, a one-turn and a text-only row
    dataset, collator = build_supervised_data(
        processor.tokenizer, data_args=data_args, version="auto", processor=processor
    )
    assert isinstance(dataset, PromptSuffixDataset) and isinstance(collator, ProcessorCollator)
    assert dataset.summary.kept == 1 and dataset.summary.skipped_bad == 2
    batch = collator([dataset[0]])
    assert set(batch) == {"input_ids", "labels", "attention_mask", *PROMPT_RULES[family]}
    row = {"input_ids": batch["input_ids"][0], "labels": batch["labels"][0]}
    assert supervised_texts(processor.tokenizer, row) == [
        ANSWERS[0] + processor.tokenizer.eos_token
    ]
