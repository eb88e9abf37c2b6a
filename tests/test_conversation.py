"""Chat templates render the exact strings of their reference formats."""

from types import SimpleNamespace

import pytest

from llava.conversation import (
    TEMPLATES,
    VICUNA_SYSTEM,
    Segment,
    Turn,
    get_template,
    render,
    render_text,
)

LLAMA = SimpleNamespace(bos_token="<s>", eos_token="</s>")
TURNS = [
    Turn("user", "<image>\nWhat is {this}?"),
    Turn("assistant", "A cat."),
    Turn("user", "Colour?"),
    Turn("assistant", "Red."),
]


def test_vicuna_v1_matches_llava_reference():
    # REFERENCE.md: "{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
        "What is {this}? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Red.</s>"
    )
    assert render_text(get_template("v1"), TURNS, LLAMA) == expected
    assert VICUNA_SYSTEM in expected


def test_vicuna_segments_supervise_answers_and_eos_only():
    segments = render(get_template("vicuna_v1"), TURNS, LLAMA)
    assert [s.text for s in segments if s.supervised] == [" A cat.</s>", " Red.</s>"]
    assert segments[0].text.endswith("ASSISTANT:") and not segments[0].supervised


def test_generation_prompt_ends_with_the_assistant_header():
    segments = render(get_template("v1"), TURNS[:1], LLAMA, add_generation_prompt=True)
    assert segments == [Segment(segments[0].text, False)]
    assert segments[0].text.endswith("<image>\nWhat is {this}? ASSISTANT:")


def test_plain_keeps_only_images_and_captions():
    turns = [Turn("user", "Describe the photo.\n<image>"), Turn("assistant", "a red car")]
    assert render_text(get_template("plain"), turns, LLAMA) == "<image>a red car\n"


def test_llava_llama_2_format():
    text = render_text(get_template("llava_llama_2"), TURNS, LLAMA)
    assert text.startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant.")
    assert text.endswith(
        "<</SYS>>\n\n<image>\nWhat is {this}? [/INST] A cat.</s><s>[INST] Colour? [/INST] Red.</s>"
    )


def test_chatml_format_with_record_system():
    turns = [Turn("system", "Be brief."), *TURNS[:2]]
    assert render_text(get_template("chatml"), turns, LLAMA) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is {this}?"
        "<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>"
    )


def test_llama_3_gemma_and_mistral_formats():
    llama_3 = render_text(get_template("llama_3"), [Turn("system", "S."), *TURNS[2:]], LLAMA)
    assert llama_3 == (
        "<|start_header_id|>system<|end_header_id|>\n\nS.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nColour?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nRed.<|eot_id|>"
    )
    gemma = render_text(get_template("gemma"), TURNS[2:], LLAMA)
    assert (
        gemma
        == "<start_of_turn>user\nColour?<end_of_turn>\n<start_of_turn>model\nRed.<end_of_turn>"
    )
    mistral = render_text(get_template("mistral_instruct"), TURNS, LLAMA)
    assert (
        mistral
        == "[INST] <image>\nWhat is {this}? [/INST] A cat.</s>[INST] Colour? [/INST] Red.</s>"
    )


def test_llava_version_names_resolve_and_unknown_fails():
    assert get_template("v1") is get_template("llava_v1") is get_template("vicuna_v1")
    assert get_template("qwen") is get_template("chatml")
    for name in ("plain", "llava_llama_2", "llama_3", "mistral_instruct", "gemma", "auto"):
        assert name in TEMPLATES
    with pytest.raises(ValueError, match="unknown --version 'v9'"):
        get_template("v9")


def test_auto_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat_template"):
        render(get_template("auto"), TURNS, SimpleNamespace(chat_template=None))


def test_auto_template_errors_are_value_errors():
    class Refusing:
        chat_template = "x"

        def apply_chat_template(self, *args, **kwargs):
            raise RuntimeError("System role not supported")

    with pytest.raises(ValueError, match="System role not supported"):
        render(get_template("auto"), TURNS, Refusing())
