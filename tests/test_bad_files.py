"""Every model, adapter and checkpoint file that cannot be read is named in the error."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from llava.files import (
    MissingFileError,
    UnreadableFileError,
    check_readable,
    load_safetensors_file,
    load_torch_file,
    read_json_file,
)
from llava.model.builder import build_llava_model, load_pretrained_model, load_tokenizer
from llava.model.weights import read_non_lora_trainables, read_projector_file
from tests.fixtures.checkpoints import write_lora_checkpoint, write_projector_checkpoint
from tests.fixtures.models import save_tiny_llm
from tests.fixtures.tokenizers import save_sentencepiece_llama_tokenizer
from tests.test_loading import merge


def truncate(path: str) -> str:
    """Cut a file to half its size, as a copy or a save that died halfway leaves it."""
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def naming(path: str) -> str:
    """A pytest.raises `match` for a message that names `path`."""
    return re.escape(str(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_clip_path) -> dict[str, str]:
    """A base LLM and a full, a LoRA and a projector checkpoint over it, each written once."""
    root = tmp_path_factory.mktemp("checkpoints")
    base = str(root / "base")
    save_tiny_llm(base, "llama")
    save_sentencepiece_llama_tokenizer(base, legacy=False)
    full = str(root / "full")
    build_llava_model(base, tiny_clip_path).save_pretrained(full)
    lora, projector = str(root / "lora"), str(root / "projector")
    write_lora_checkpoint(base, tiny_clip_path, lora)
    write_projector_checkpoint(base, tiny_clip_path, projector)
    return {"base": base, "full": full, "lora": lora, "projector": projector}


@pytest.fixture
def copy_of(saved, tmp_path):
    """A fresh copy of a saved folder, for a test to damage."""

    def copy(name: str) -> str:
        return shutil.copytree(saved[name], str(tmp_path / name))

    return copy


@pytest.fixture
def empty_folder(tmp_path) -> str:
    folder = tmp_path / "empty"
    folder.mkdir()
    return str(folder)


# -- folders -----------------------------------------------------------------------------------
def test_an_empty_folder_as_model_path_says_what_belongs_there(empty_folder):
    with pytest.raises(UnreadableFileError, match=naming(empty_folder)) as error:
        load_pretrained_model(empty_folder)
    assert "empty folder" in str(error.value)
    assert "adapter_config.json" in str(error.value) and "mm_projector.bin" in str(error.value)


def test_an_empty_folder_as_model_base_is_named(saved, empty_folder):
    with pytest.raises(UnreadableFileError, match=naming(empty_folder)) as error:
        load_pretrained_model(saved["lora"], model_base=empty_folder)
    assert "empty folder" in str(error.value) and "config.json" in str(error.value)


def test_an_empty_folder_as_model_name_or_path_is_named(empty_folder, tiny_clip_path):
    with pytest.raises(UnreadableFileError, match=naming(empty_folder)):
        build_llava_model(empty_folder, tiny_clip_path)


def test_an_empty_folder_as_the_tokenizer_is_named(empty_folder):
    """Training loads the tokenizer of --model_name_or_path before the model."""
    with pytest.raises(UnreadableFileError, match=naming(empty_folder) + ": empty folder"):
        load_tokenizer(empty_folder)


def test_a_truncated_tokenizer_json_is_named(copy_of):
    base = copy_of("base")
    path = truncate(os.path.join(base, "tokenizer.json"))
    with pytest.raises(UnreadableFileError, match=naming(path) + ": truncated JSON"):
        load_tokenizer(base)


def test_a_model_folder_without_weights_is_named(copy_of, tiny_clip_path):
    base = copy_of("base")
    os.remove(os.path.join(base, "model.safetensors"))
    with pytest.raises(MissingFileError, match=naming(base) + ": no model weights"):
        build_llava_model(base, tiny_clip_path)


# -- weights -----------------------------------------------------------------------------------
def test_truncated_model_safetensors_of_a_full_checkpoint(copy_of):
    path = truncate(os.path.join(copy_of("full"), "model.safetensors"))
    with pytest.raises(UnreadableFileError, match=naming(path) + ": truncated safetensors"):
        load_pretrained_model(os.path.dirname(path))


def test_truncated_model_safetensors_of_a_base_model(copy_of, tiny_clip_path):
    path = truncate(os.path.join(copy_of("base"), "model.safetensors"))
    with pytest.raises(UnreadableFileError, match=naming(path)):
        build_llava_model(os.path.dirname(path), tiny_clip_path)


def test_truncated_adapter_model_safetensors(copy_of, saved):
    path = truncate(os.path.join(copy_of("lora"), "adapter_model.safetensors"))
    with pytest.raises(UnreadableFileError, match=naming(path) + ": truncated safetensors"):
        load_pretrained_model(os.path.dirname(path), model_base=saved["base"])
    with pytest.raises(UnreadableFileError, match=naming(path)):
        merge(os.path.dirname(path), saved["base"], os.path.dirname(path) + "_merged")


def test_truncated_mm_projector_bin(copy_of, saved):
    path = truncate(os.path.join(copy_of("projector"), "mm_projector.bin"))
    with pytest.raises(UnreadableFileError, match=naming(path) + ": truncated"):
        load_pretrained_model(os.path.dirname(path), model_base=saved["base"])
    with pytest.raises(UnreadableFileError, match=naming(path)):
        read_projector_file(path)  # what --pretrain_mm_mlp_adapter reads


def test_empty_non_lora_trainables_bin(copy_of, saved):
    path = os.path.join(copy_of("lora"), "non_lora_trainables.bin")
    os.truncate(path, 0)
    with pytest.raises(UnreadableFileError, match=naming(path) + ": empty file"):
        load_pretrained_model(os.path.dirname(path), model_base=saved["base"])
    with pytest.raises(UnreadableFileError, match=naming(path) + ": empty file"):
        read_non_lora_trainables(path, torch.nn.Module())


def test_a_torch_file_that_holds_no_state_dict_is_named(tmp_path):
    path = str(tmp_path / "mm_projector.bin")
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UnreadableFileError, match=naming(path) + ": holds a list"):
        read_projector_file(path)


# -- JSON --------------------------------------------------------------------------------------
def test_invalid_config_json(copy_of):
    path = os.path.join(copy_of("full"), "config.json")
    with open(path, "a") as f:
        f.write("}")
    with pytest.raises(UnreadableFileError, match=naming(path) + r": invalid JSON at line \d+"):
        load_pretrained_model(os.path.dirname(path))


def test_truncated_adapter_config_json(copy_of, saved):
    path = truncate(os.path.join(copy_of("lora"), "adapter_config.json"))
    with pytest.raises(UnreadableFileError, match=naming(path) + ": truncated JSON"):
        load_pretrained_model(os.path.dirname(path), model_base=saved["base"])


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (
            b'{"global_step": 5, "log_history": [',
            "truncated JSON: the file ends before its document closes",
        ),
        (b'{"global_step": 5,, }', "invalid JSON at line 1 column 19"),
        (b'{"best_model_checkpoint": "\xff"}', "not UTF-8 text"),
    ],
)
def test_read_json_file_names_the_file_and_the_fault(tmp_path, content, reason):
    path = tmp_path / "trainer_state.json"
    path.write_bytes(content)
    with pytest.raises(UnreadableFileError, match=naming(path) + ": " + reason):
        read_json_file(path)


def test_a_missing_file_is_both_unreadable_and_not_found(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(FileNotFoundError, match=naming(path)):
        read_json_file(path)
    with pytest.raises(UnreadableFileError, match=naming(path)):
        check_readable(path)


# -- check_readable on training checkpoint files -----------------------------------------------
def optimizer_state() -> dict:
    """Shaped like optimizer.pt: per-parameter Adam moments and the param groups."""
    moments = {"exp_avg": torch.randn(64, 64), "exp_avg_sq": torch.rand(64, 64)}
    return {"state": {0: moments}, "param_groups": [{"lr": 1e-3, "params": [0]}]}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_check_readable_finds_a_truncated_torch_file(tmp_path, legacy):
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer_state(), path, _use_new_zipfile_serialization=not legacy)
    check_readable(path)
    assert load_torch_file(path)["state"][0]["exp_avg"].shape == (64, 64)
    truncate(str(path))
    with pytest.raises(UnreadableFileError, match=naming(path) + ": (truncated|torch.load failed)"):
        check_readable(path)
    with pytest.raises(UnreadableFileError, match=naming(path)):
        load_torch_file(path)


def test_check_readable_finds_a_truncated_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.randn(16, 16), "b": torch.randn(3)}
    save_file(tensors, path)
    check_readable(path)
    assert torch.equal(load_safetensors_file(path)["b"], tensors["b"])
    os.truncate(path, os.path.getsize(path) - 1)  # one byte short is found as well
    with pytest.raises(UnreadableFileError, match=naming(path) + ": truncated safetensors file"):
        check_readable(path)
    with pytest.raises(UnreadableFileError, match=naming(path)):
        load_safetensors_file(path)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("rng_state.pth", b"not a torch file", "not a torch.save file"),
        ("model.safetensors", b"\xff" * 16, "not a safetensors file"),
        ("latest", b"", "empty file"),
    ],
)
def test_check_readable_names_files_in_no_known_format(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableFileError, match=naming(path) + ": " + reason):
        check_readable(path)
