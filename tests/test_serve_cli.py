"""The terminal chat: history grows turn by turn, temperature 0 is greedy, bad flags are named."""

from __future__ import annotations

import io
import os

import pytest

from llava.constants import IMAGE_PLACEHOLDER_ID
from llava.inference import Answerer
from llava.model.builder import load_pretrained_model
from llava.serve import cli
from tests.fixtures.datasets import write_shapes_dataset
from tests.test_eval import greedy_answer, save_tiny_llava

MAX_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_path, tiny_clip_path, sp_llama_tokenizer_path) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_llava"))
    return save_tiny_llava(folder, tiny_llama_path, tiny_clip_path, sp_llama_tokenizer_path)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    shapes = write_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_images=1)
    return os.path.join(shapes["image_folder"], "000.png")


def test_chat_keeps_history_and_answers_greedily(model_dir, image_file, monkeypatch, capsys):
    prompts = []
    generate = Answerer.generate

    def recording_generate(self, batch, **kwargs):
        prompts.extend(batch)
        return generate(self, batch, **kwargs)

    monkeypatch.setattr(Answerer, "generate", recording_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\nIs it a square?\n\n"))
    cli.main(
        ["--model-path", model_dir, "--image-file", image_file, "--temperature", "0",
         "--max-new-tokens", str(MAX_NEW_TOKENS)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert len(prompts) == 2  # the empty line ended the chat

    loaded = load_pretrained_model(model_dir)
    answers = [greedy_answer(loaded.model, loaded.tokenizer, p, MAX_NEW_TOKENS) for p in prompts]
    assert all(answers)
    for answer in answers:
        assert f"ASSISTANT: {answer}" in out  # streamed as it was generated
    first, second = (
        loaded.tokenizer.decode([i for i in p.input_ids if i != IMAGE_PLACEHOLDER_ID])
        for p in prompts
    )
    assert second.startswith(first)  # the history grows
    assert f"{first} {answers[0]}</s>USER: Is it a square? ASSISTANT:" in second
    assert [p.input_ids.count(IMAGE_PLACEHOLDER_ID) for p in prompts] == [
        loaded.model.num_image_tokens
    ] * 2  # the image goes with the first question only


def test_a_missing_image_file_is_named_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "nowhere.png")
    with pytest.raises(SystemExit, match=r"--image-file '.*nowhere.png' does not exist"):
        cli.main(["--model-path", str(tmp_path / "no-model"), "--image-file", missing])
