"""Chat templates as data: how a conversation renders into prompt and supervised text segments.

A template never tokenizes. It turns a list of turns into `Segment`s, each a piece of text and
whether the model is trained to produce it (an assistant answer and its end token) or only
reads it (system text, user turns, role headers). `llava.data.tokenize` then encodes each
segment on its own and concatenates the ids, so a label is supervised exactly when its segment
is. `--version` names a template as in LLaVA (`plain`, `v1`, `llava_llama_2`, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llava.constants import IMAGE_TOKEN

SYSTEM = "system"
USER = "user"
ASSISTANT = "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: `role` is system, user or assistant."""

    role: str
    text: str


@dataclass(frozen=True)
class Segment:
    """A run of rendered text; `supervised` marks text the model learns to produce."""

    text: str
    supervised: bool


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data.

    Formats hold `{content}`, `{system}`, `{bos}` and `{eos}` fields; `{bos}`/`{eos}` become the
    tokenizer's own BOS/EOS text, so `v1` ends answers with `</s>` on Llama and with
    `<|endoftext|>` on Qwen. The tokenizer's leading BOS is added by the tokenizer side, never
    written here.
    """

    name: str
    system: str = ""  # default system message; a record's own system turn replaces it
    system_format: str = ""  # rendered once when the system text is not empty
    system_in_first_user: bool = False  # llama_2 / mistral / gemma: system opens 1st user turn
    user_format: str = "{content}"
    user_separator: str = ""  # prompt text before every user turn but the first
    assistant_header: str = ""  # prompt text opening each assistant turn (generation prompt)
    assistant_format: str = "{content}{eos}"  # supervised: the answer and its end token
    keep_user_text: bool = True  # plain: only the user's <image> tags are kept
    uses_tokenizer_template: bool = False  # auto: tokenizer.chat_template renders


PLAIN = ChatTemplate(name="plain", keep_user_text=False, assistant_format="{content}\n")
VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    system=VICUNA_SYSTEM,
    system_format="{system} ",
    user_format="USER: {content}",
    assistant_header=" ASSISTANT:",
    assistant_format=" {content}{eos}",
)
# The original ends answers with " </s>"; the space is dropped so the label is the answer and EOS.
LLAVA_LLAMA_2 = ChatTemplate(
    name="llava_llama_2",
    system=LLAVA_SYSTEM,
    system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    system_in_first_user=True,
    user_format="[INST] {content} [/INST]",
    user_separator="{bos}",
    assistant_format=" {content}{eos}",
)
LLAMA_3 = ChatTemplate(
    name="llama_3",
    system=LLAVA_SYSTEM,
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_format="{content}<|eot_id|>",
)
CHATML = ChatTemplate(
    name="chatml",
    system="You are a helpful assistant.",
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n",
    user_separator="\n",
    assistant_header="<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>",
)
MISTRAL_INSTRUCT = ChatTemplate(
    name="mistral_instruct",
    system_format="{system}\n\n",
    system_in_first_user=True,
    user_format="[INST] {content} [/INST]",
    assistant_format=" {content}{eos}",
)
GEMMA = ChatTemplate(
    name="gemma",
    system_format="{system}\n\n",
    system_in_first_user=True,
    user_format="<start_of_turn>user\n{content}<end_of_turn>\n",
    user_separator="\n",
    assistant_header="<start_of_turn>model\n",
    assistant_format="{content}<end_of_turn>",
)
AUTO = ChatTemplate(name="auto", uses_tokenizer_template=True)

# --version names, LLaVA's included, mapped to templates.
TEMPLATES: dict[str, ChatTemplate] = {
    "plain": PLAIN,
    "v1": VICUNA_V1,
    "vicuna_v1": VICUNA_V1,
    "llava_v1": VICUNA_V1,
    "llava_llama_2": LLAVA_LLAMA_2,
    "llama_3": LLAMA_3,
    "llava_llama_3": LLAMA_3,
    "chatml": CHATML,
    "qwen": CHATML,
    "qwen_2": CHATML,
    "mistral_instruct": MISTRAL_INSTRUCT,
    "gemma": GEMMA,
    "gemma_instruct": GEMMA,
    "auto": AUTO,
}


def get_template(version: str) -> ChatTemplate:
    """The template a `--version` names; unknown names fail instead of falling back."""
    if version not in TEMPLATES:
        raise ValueError(f"unknown --version {version!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[version]


def fill(format_string: str, content: str = "", bos: str = "", eos: str = "") -> str:
    """Substitute the format fields; `content` goes in last so braces in user text stay."""
    text = format_string.replace("{bos}", bos).replace("{eos}", eos)
    for field in ("{system}", "{content}"):
        if field in text:
            before, after = text.split(field, 1)
            return before + content + after
    return text


def split_system(turns: list[Turn], default_system: str) -> tuple[str, list[Turn]]:
    """The system text (the record's own, else the template's) and the remaining turns."""
    if turns and turns[0].role == SYSTEM:
        return turns[0].text, list(turns[1:])
    return default_system, list(turns)


def image_tags(text: str) -> str:
    """Only the <image> tags of a text, in order (what `plain` keeps of a user turn)."""
    return IMAGE_TOKEN * text.count(IMAGE_TOKEN)


def render_fixed(
    template: ChatTemplate, turns: list[Turn], bos: str, eos: str, add_generation_prompt: bool
) -> list[Segment]:
    """Render with one of the templates written in this module."""
    system, dialog = split_system(turns, template.system)
    segments: list[Segment] = []
    prompt = (
        fill(template.system_format, system) if system and not template.system_in_first_user else ""
    )
    seen_user = False
    for turn in dialog:
        if turn.role == USER:
            content = turn.text if template.keep_user_text else image_tags(turn.text)
            if not seen_user and system and template.system_in_first_user:
                content = fill(template.system_format, system) + content
            if seen_user:
                prompt += fill(template.user_separator, bos=bos, eos=eos)
            prompt += fill(template.user_format, content, bos=bos, eos=eos)
            seen_user = True
        else:
            prompt += fill(template.assistant_header, bos=bos, eos=eos)
            segments.append(Segment(prompt, supervised=False))
            segments.append(Segment(fill(template.assistant_format, turn.text, bos, eos), True))
            prompt = ""
    if add_generation_prompt:
        prompt += fill(template.assistant_header, bos=bos, eos=eos)
    segments.append(Segment(prompt, supervised=False))
    return [segment for segment in segments if segment.text]


def apply_chat_template(tokenizer: Any, turns: list[Turn], add_generation_prompt: bool) -> str:
    """tokenizer.chat_template applied to turns; its own errors become ValueError."""
    messages = [{"role": turn.role, "content": turn.text} for turn in turns]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # jinja raises TemplateError (e.g. "no system role")
        raise ValueError(f"the tokenizer's chat_template failed: {error}") from error


def content_parts(text: str) -> list[dict[str, str]]:
    """A turn's text as the content parts VLM templates expect: an image part per <image> tag
    and text parts between, in order.

    Newlines touching a tag are dropped: LLaVA data writes "<image>\n" to put the image first,
    and a template with parts places its own separators around images.
    """
    parts: list[dict[str, str]] = []
    pieces = text.split(IMAGE_TOKEN)
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image"})
            piece = piece.lstrip("\n")
        if k < len(pieces) - 1:
            piece = piece.rstrip("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def apply_parts_template(processor: Any, turns: list[Turn], add_generation_prompt: bool) -> str:
    """A processor's chat template (else its tokenizer's) applied to turns given as content parts;
    the template writes its own image placeholder for each image part."""
    template = getattr(processor, "chat_template", None)
    template = template or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise ValueError("--version auto needs a processor or tokenizer with a chat_template")
    messages = [{"role": turn.role, "content": content_parts(turn.text)} for turn in turns]
    try:
        return processor.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:  # jinja raises TemplateError (e.g. "no system role")
        raise ValueError(f"the processor's chat_template failed: {error}") from error


# (turns, add_generation_prompt) -> the whole conversation rendered by a chat template
ChatText = Callable[[list[Turn], bool], str]


def end_of_answer(tail: str, special_tokens: list[str]) -> int:
    """How much of the text after an answer is its end token (the first special token)."""
    stripped = tail.lstrip(" ")
    for token in special_tokens:
        if token and stripped.startswith(token):
            return len(tail) - len(stripped) + len(token)
    return len(tail.rstrip())


def render_auto(
    tokenizer: Any,
    turns: list[Turn],
    add_generation_prompt: bool,
    chat_text: ChatText | None = None,
) -> list[Segment]:
    """Render with a chat template, one assistant turn at a time.

    The text before an answer is the template's generation prompt for the turns so far; the
    supervised text is what the template adds for the answer, up to and including the first
    special token after it (the end-of-turn token). Text after that belongs to the next prompt.
    `chat_text` renders turns (default: `tokenizer.chat_template` on string contents; a VLM's
    processor template on content parts, see `apply_parts_template`); the tokenizer names the
    special tokens.
    """
    if chat_text is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--version auto needs a tokenizer with a chat_template")
        chat_text = functools.partial(apply_chat_template, tokenizer)
    special_tokens = sorted(getattr(tokenizer, "all_special_tokens", []), key=len, reverse=True)
    special_tokens += sorted(getattr(tokenizer, "added_tokens_encoder", {}), key=len, reverse=True)
    segments: list[Segment] = []
    done = ""  # the rendered text already placed into segments
    for k, turn in enumerate(turns):
        if turn.role != ASSISTANT:
            continue
        before = chat_text(turns[:k], True)
        full = chat_text(turns[: k + 1], False)
        if not before.startswith(done) or not full.startswith(before):
            raise ValueError(
                "the tokenizer's chat_template does not render a conversation as a growing "
                "prefix; use a named --version instead of auto"
            )
        added = full[len(before) :]
        answer = turn.text.strip()
        answer_at = added.find(answer)
        if answer_at < 0:
            raise ValueError("the tokenizer's chat_template changes the answer text")
        lead = added[:answer_at]  # role header when the template has no generation prompt
        start = len(lead.rstrip(" ")) if lead.strip() else 0
        end = answer_at + len(answer)
        end += end_of_answer(added[end:], special_tokens)
        segments.append(Segment(before[len(done) :] + added[:start], supervised=False))
        segments.append(Segment(added[start:end], supervised=True))
        done = before + added[:end]
    if add_generation_prompt:
        final = chat_text(turns, True)
        segments.append(Segment(final[len(done) :], supervised=False))
    return [segment for segment in segments if segment.text]


def render(
    template: ChatTemplate, turns: list[Turn], tokenizer: Any, add_generation_prompt: bool = False
) -> list[Segment]:
    """Prompt and supervised segments of a conversation; <image> tags stay in the text.

    `tokenizer` gives the BOS/EOS text (and the chat template for `auto`); with
    `add_generation_prompt` the last segment ends where the model starts to answer.
    """
    if template.uses_tokenizer_template:
        return render_auto(tokenizer, turns, add_generation_prompt)
    bos = getattr(tokenizer, "bos_token", None) or ""
    eos = getattr(tokenizer, "eos_token", None) or ""
    if not eos and "{eos}" in template.assistant_format:
        raise ValueError(
            f"template {template.name!r} ends answers with EOS; the tokenizer has none"
        )
    return render_fixed(template, turns, bos, eos, add_generation_prompt)


def render_text(
    template: ChatTemplate, turns: list[Turn], tokenizer: Any, add_generation_prompt: bool = False
) -> str:
    """The whole rendered conversation as one string (for display and golden tests)."""
    return "".join(s.text for s in render(template, turns, tokenizer, add_generation_prompt))
