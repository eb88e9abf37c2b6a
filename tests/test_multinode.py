"""Beyond one machine: the commands launch.sh builds for several machines, the SLURM batch
script, the checks that every rank sees one output folder, LLaVA-1.5's train_mem.py entry, and
LoRA stage 2 under ZeRO-3 run as two "nodes" on this machine (two launches of one process each,
torchrun's static rendezvous or the deepspeed launcher with a hostfile, one shared output
folder): the losses of one machine of two processes, every rank's shards committed, and a
resume with the same losses.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from llava.compat import save_tokenizer
from llava.train.commit import COMPLETE_MARKER, commit_checkpoint, marked_sizes, rank_files
from llava.train.run_folder import OutputDirNotSharedError
from llava.train.train_mem import FLASH_ATTENTION, with_attention_choice
from tests.fixtures.script_runs import common_flags, script_env
from tests.fixtures.training import (
    DEEPSPEED_HELPERS,
    REPO,
    dry_run_arguments,
    free_port,
    logged_losses,
    run_script,
)

TRAIN = "llava/train/train.py"


def dry_run_or_error(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", os.path.join(REPO, "scripts", script)],
        env={**os.environ, **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
    )


def launcher_part(arguments: list[str]) -> list[str]:
    """The launcher and its options, up to the training entry."""
    return arguments[: arguments.index(TRAIN)]


# -- launch.sh ------------------------------------------------------------------------------------
def test_one_machine_commands_are_unchanged():
    env = {"NUM_GPUS": "8", "MASTER_PORT": "29501"}
    deepspeed = dry_run_arguments("finetune.sh", env)
    assert launcher_part(deepspeed) == ["deepspeed", "--num_gpus", "8", "--master_port", "29501"]
    torchrun = dry_run_arguments("finetune.sh", {**env, "LAUNCHER": "torchrun"})
    assert launcher_part(torchrun) == [
        "torchrun",
        "--nproc_per_node",
        "8",
        "--master_port",
        "29501",
    ]


def test_torchrun_static_rendezvous_across_machines():
    env = {"LAUNCHER": "torchrun", "NUM_GPUS": "4", "NNODES": "2", "NODE_RANK": "1"}
    env["MASTER_ADDR"] = "10.0.0.1"
    assert launcher_part(dry_run_arguments("pretrain.sh", env)) == [
        "torchrun", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
        "--nproc_per_node", "4", "--master_port", "29500",
    ]  # fmt: skip


def test_torchrun_c10d_rendezvous_across_machines():
    env = {"LAUNCHER": "torchrun", "NUM_GPUS": "8", "NNODES": "4", "MASTER_ADDR": "node-a"}
    env |= {"RDZV_BACKEND": "c10d", "MASTER_PORT": "29600", "SLURM_JOB_ID": "1234"}
    assert launcher_part(dry_run_arguments("finetune_lora.sh", env)) == [
        "torchrun", "--nnodes", "4", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node-a:29600",
        "--rdzv_id", "1234", "--nproc_per_node", "8", "--master_port", "29600",
    ]  # fmt: skip


def test_deepspeed_hostfile_launches(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    env = {"HOSTFILE": str(hostfile), "NUM_GPUS": "8", "MASTER_ADDR": "node-a"}
    # From one machine over ssh (pdsh): the launcher starts every machine of the hostfile.
    assert launcher_part(dry_run_arguments("finetune.sh", env)) == [
        "deepspeed", "--hostfile", str(hostfile), "--master_addr", "node-a",
        "--num_gpus", "8", "--master_port", "29500",
    ]  # fmt: skip
    # Each machine runs the script itself (as under SLURM): no ssh, its own rank.
    env |= {"NNODES": "2", "NODE_RANK": "1"}
    assert launcher_part(dry_run_arguments("finetune.sh", env)) == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--master_addr", "node-a",
        "--no_ssh", "--node_rank", "1", "--num_gpus", "8", "--master_port", "29500",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2", "NODE_RANK": "0"}, "reaches other machines only through a hostfile"),
        ({"HOSTFILE": "/nonexistent/hostfile"}, "HOSTFILE=/nonexistent/hostfile: no such file"),
        ({"LAUNCHER": "torchrun", "NNODES": "2"}, "needs NODE_RANK and MASTER_ADDR"),
        ({"LAUNCHER": "torchrun", "NNODES": "2", "RDZV_BACKEND": "c10d"}, "needs MASTER_ADDR"),
        ({"LAUNCHER": "torchrun", "RDZV_BACKEND": "etcd"}, "RDZV_BACKEND must be c10d"),
        ({"DEVICE": "hpu", "NNODES": "2"}, "DEVICE=hpu runs on one machine"),
        ({"LAUNCHER": "python", "NNODES": "2"}, "LAUNCHER=python starts one process"),
    ],
)
def test_incomplete_multi_machine_settings_are_refused(env, message):
    result = dry_run_or_error("finetune.sh", env)
    assert result.returncode == 2 and message in result.stderr, result
    assert result.stdout == ""


# -- SLURM ----------------------------------------------------------------------------------------
FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames NODELIST (the fake job's two nodes)
printf 'node-a\\nnode-b\\n'
"""
FAKE_SRUN = """#!/usr/bin/env bash
# srun --nodes N --ntasks-per-node 1 ... COMMAND: COMMAND once per node, as SLURM would.
echo "srun $*" >&2
while [ "$1" != bash ]; do shift; done
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" || exit; done
"""


def write_executable(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path) -> dict[str, str]:
    """A PATH with fake srun and scontrol, and the variables of a two-node job."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    write_executable(bin_folder / "scontrol", FAKE_SCONTROL)
    write_executable(bin_folder / "srun", FAKE_SRUN)
    return {
        "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": REPO,
        "TMPDIR": str(tmp_path),
        "NUM_GPUS": "4",
        "DRY_RUN": "1",
    }


def run_batch_script(env: dict[str, str], *args: str) -> tuple[list[list[str]], str]:
    """(each node's dry-run command, srun's command line) of scripts/slurm/train.sbatch."""
    result = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "slurm", "train.sbatch"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        cwd="/",  # the batch script works from SLURM_SUBMIT_DIR, as under sbatch
    )
    commands, current = [], []
    for line in result.stdout.splitlines():
        if line in ("torchrun", "deepspeed") and current:
            commands.append(current)
            current = []
        current.append(line)
    commands.append(current)
    return commands, result.stderr


@pytest.mark.parametrize("name", ["train.sbatch", "node.sh"])
def test_slurm_scripts_parse(name):
    subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "slurm", name)], check=True)


def test_slurm_job_runs_the_stage_on_every_node_with_torchrun(fake_slurm):
    commands, srun = run_batch_script(fake_slurm, "scripts/finetune.sh", "--num_train_epochs", "2")
    assert "--ntasks-per-node 1" in srun
    assert [launcher_part(command) for command in commands] == [
        ["torchrun", "--nnodes", "2", "--node_rank", str(rank), "--master_addr", "node-a",
         "--nproc_per_node", "4", "--master_port", "29500"]
        for rank in (0, 1)
    ]  # fmt: skip
    for command in commands:  # the stage's flags, then the job's
        assert command[command.index("--version") + 1] == "v1"
        assert command[-2:] == ["--num_train_epochs", "2"]


def test_slurm_job_with_the_deepspeed_launcher_writes_a_hostfile(fake_slurm):
    env = {**fake_slurm, "LAUNCHER": "deepspeed", "MASTER_PORT": "29700"}
    commands, _ = run_batch_script(env, "scripts/pretrain.sh")
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        hostfile = command[command.index("--hostfile") + 1]
        with open(hostfile) as f:
            assert f.read() == "node-a slots=4\nnode-b slots=4\n"
        assert launcher_part(command) == [
            "deepspeed", "--hostfile", hostfile, "--num_nodes", "2", "--master_addr", "node-a",
            "--no_ssh", "--node_rank", str(rank), "--num_gpus", "4", "--master_port", "29700",
        ]  # fmt: skip


# -- every rank's files, one folder ---------------------------------------------------------------
def write_files(folder, names: list[str]) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 8)


def write_rank_files(folder, rank: int) -> None:
    """What one rank writes into a ZeRO-3 checkpoint by itself."""
    write_files(
        folder,
        [
            f"rng_state_{rank}.pth",
            f"global_step3/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            f"global_step3/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
        ],
    )


def deepspeed_checkpoint(folder) -> None:
    """A ZeRO-3 checkpoint's layout as rank 0, the committing process, wrote it."""
    write_files(folder, ["trainer_state.json", "run_flags.json"])
    (folder / "latest").write_text("global_step3")
    write_rank_files(folder, 0)


def test_rank_files_follow_rank_zeros_names(tmp_path):
    deepspeed_checkpoint(tmp_path)
    assert rank_files(str(tmp_path), 1) == []
    assert rank_files(str(tmp_path), 2) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
        "global_step3/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "global_step3/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "global_step3/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "global_step3/zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]


def test_a_commit_refuses_a_checkpoint_without_other_ranks_files(tmp_path, monkeypatch):
    """Rank 1 wrote to its own machine's disk: the commit names its files, marks nothing."""
    monkeypatch.setattr("llava.train.commit.RANK_FILES_WAIT_SECONDS", 0.0)
    deepspeed_checkpoint(tmp_path)
    with pytest.raises(OutputDirNotSharedError, match="rng_state_1.pth.*not one folder"):
        commit_checkpoint(str(tmp_path), world_size=2)
    assert not os.path.exists(tmp_path / COMPLETE_MARKER)


def test_a_commit_waits_for_files_a_shared_file_system_shows_late(tmp_path):
    deepspeed_checkpoint(tmp_path)
    late = threading.Timer(1.0, write_rank_files, args=(tmp_path, 1))
    late.start()
    started = time.monotonic()
    commit_checkpoint(str(tmp_path), world_size=2)
    late.join()
    assert time.monotonic() - started >= 1.0
    assert set(rank_files(str(tmp_path), 2)) <= set(marked_sizes(str(tmp_path)))


def check_folders_in_process(rank: int, init_file: str, folders: list[str], results: str) -> None:
    """One rank of a gloo group of two: lock its folder if rank 0, then the shared check."""
    from llava.train.run_folder import check_output_dir_shared, lock_output_dir

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)  # fmt: skip
    lock = lock_output_dir(folders[rank]) if rank == 0 else None
    torch.distributed.barrier()
    try:
        check_output_dir_shared(folders[rank])
        outcome = "ok"
    except OutputDirNotSharedError as error:
        outcome = str(error)
    with open(f"{results}.{rank}", "w") as f:
        f.write(outcome)
    torch.distributed.destroy_process_group()
    if lock is not None:
        lock.release()


def shared_check_outcomes(tmp_path, folders: list[str]) -> list[str]:
    results = str(tmp_path / "result")
    torch.multiprocessing.spawn(
        check_folders_in_process, args=(str(tmp_path / "init"), folders, results), nprocs=2
    )
    return [open(f"{results}.{rank}").read() for rank in (0, 1)]


@pytest.mark.slow  # two processes of a gloo group: about 10 s
def test_ranks_that_see_one_folder_pass_the_shared_check(tmp_path):
    shared = str(tmp_path / "run")
    assert shared_check_outcomes(tmp_path, [shared, shared]) == ["ok", "ok"]


@pytest.mark.slow  # two processes of a gloo group: about 10 s
def test_ranks_on_machines_with_folders_of_their_own_stop_at_the_start(tmp_path):
    """Rank 1's "machine" has its own folder, holding an older run's lock file."""
    own = tmp_path / "node1" / "run"
    own.mkdir(parents=True)
    (own / "run.lock").write_text("host elsewhere, pid 1, since yesterday\n")
    outcomes = shared_check_outcomes(tmp_path, [str(tmp_path / "node0" / "run"), str(own)])
    for outcome in outcomes:  # every rank stops, with the same message
        assert "is not one folder for every process of the run" in outcome
        assert "rank 1 on" in outcome and "host elsewhere, pid 1" in outcome
    assert outcomes[0].split(" is not")[1] == outcomes[1].split(" is not")[1]


# -- train_mem.py ---------------------------------------------------------------------------------
def test_train_mem_chooses_flash_attention_only_where_it_can_run():
    argv = ["--output_dir", "out"]
    chosen, line = with_attention_choice(argv, flash_available=True)
    assert chosen == [*argv, "--attn_implementation", FLASH_ATTENTION]
    assert "flash_attn is installed" in line
    assert with_attention_choice(argv, flash_available=False)[0] == argv
    for given in (["--attn_implementation", "eager"], ["--attn_implementation=eager"]):
        assert with_attention_choice(argv + given, flash_available=True)[0] == argv + given


def original_pretrain_command(assets: dict[str, str], output_dir: str, port: int) -> list[str]:
    """LLaVA-1.5's scripts/v1_5/pretrain.sh, paths and sizes changed; see the comments."""
    return [
        # The original runs `deepspeed llava/train/train_mem.py`: on a machine without GPUs
        # the launcher counts one device, so the test asks for 2 processes and its own port.
        "deepspeed", "--num_gpus", "2", "--master_port", str(port),
        "llava/train/train_mem.py",
        "--deepspeed", "./scripts/zero2.json",
        "--model_name_or_path", assets["llm"],
        "--version", "plain",
        "--data_path", assets["pretrain"],
        "--image_folder", assets["image_folder"],
        "--vision_tower", assets["clip"],
        "--mm_projector_type", "mlp2x_gelu",
        "--tune_mm_mlp_adapter", "True",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--bf16", "False",  # the original's True: transformers refuses bf16 without a GPU
        "--output_dir", output_dir,
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--evaluation_strategy", "no",
        "--save_strategy", "steps",
        "--save_steps", "24000",
        "--save_total_limit", "1",
        "--learning_rate", "1e-3",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--tf32", "False",  # the original's True needs an Ampere GPU
        "--model_max_length", "128",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "4",
        "--lazy_preprocess", "True",
        "--report_to", "none",  # the original's wandb: not installed, and no network here
        "--max_steps", "3",  # size: 3 steps of the tiny data set
    ]  # fmt: skip


@pytest.mark.slow
def test_llava_1_5_train_mem_command_line_trains(training_assets, tmp_path):
    output = str(tmp_path / "pretrain")
    log = output + ".log"
    command = original_pretrain_command(training_assets, output, free_port())
    with open(log, "w") as out:
        result = subprocess.run(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=900
        )
    with open(log) as f:
        logged = f.read()
    assert result.returncode == 0, logged[-6000:]
    assert "train_mem: attention: the default (sdpa), not flash_attention_2" in logged
    assert sorted(logged_losses(output)) == [1, 2, 3]
    assert {"mm_projector.bin", "config.json", "run_complete.json"} <= set(os.listdir(output))


# -- two "nodes" on this machine ------------------------------------------------------------------
def launch_two_nodes(assets: dict[str, str], output_dir: str, **env: str) -> list[str]:
    """finetune_lora.sh under ZeRO-3 as two machines of one process each (torchrun's static
    rendezvous at 127.0.0.1), started together on one shared output folder; their logs."""
    port = str(free_port())
    base = {**os.environ, **script_env(assets, "lora", output_dir), "PRETRAIN_MM_MLP_ADAPTER": ""}
    base |= {"NUM_GPUS": "1", "LAUNCHER": "torchrun", "NNODES": "2", "MASTER_ADDR": "127.0.0.1"}
    base |= {"MASTER_PORT": port, **env}
    logs, processes = [], []
    for node in (0, 1):
        log = f"{output_dir}.node{node}.log"
        with open(log, "a") as out:
            processes.append(
                subprocess.Popen(
                    ["bash", os.path.join(REPO, "scripts", "finetune_lora.sh"),
                     *common_flags("lora")],
                    env={**base, "NODE_RANK": str(node)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        logs.append(log)
    codes = [process.wait(timeout=900) for process in processes]
    texts = []
    for log in logs:
        with open(log) as f:
            texts.append(f.read())
    assert codes == [0, 0], "\n".join(f"{code}: {text[-4000:]}" for code, text in zip(codes, texts))
    return texts


def files_in(folder: str) -> set[str]:
    return {name for name in os.listdir(folder) if name not in DEEPSPEED_HELPERS}


@pytest.fixture
def tokenizer_files(training_assets, tmp_path) -> set[str]:
    """The files a save of the base tokenizer, with a chat template, writes on this line."""
    tokenizer = AutoTokenizer.from_pretrained(training_assets["llm"])
    tokenizer.chat_template = "{{ messages }}"
    save_tokenizer(tokenizer, str(tmp_path / "tokenizer"))
    return files_in(str(tmp_path / "tokenizer"))


@pytest.fixture(scope="module")
def one_machine_losses(training_assets, tmp_path_factory) -> dict[int, float]:
    """The losses of the same stage as one machine of two processes (torchrun)."""
    output_dir = str(tmp_path_factory.mktemp("one_machine") / "run")
    env = {**script_env(training_assets, "lora", output_dir), "PRETRAIN_MM_MLP_ADAPTER": ""}
    env |= {"NUM_GPUS": "2", "LAUNCHER": "torchrun"}
    run_script("finetune_lora.sh", env, *common_flags("lora"), log=output_dir + ".log")
    return logged_losses(output_dir)


def check_same_losses(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, losses, reference)


def shard_names() -> set[str]:
    """What the two ranks write into a ZeRO-3 checkpoint's global_stepN/."""
    return {
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
        for rank in (0, 1)
        for kind in ("model", "optim")
    }


@pytest.mark.slow
def test_lora_stage_on_two_nodes_under_zero3_commits_every_ranks_files_and_resumes(
    training_assets, tokenizer_files, one_machine_losses, tmp_path
):
    output = str(tmp_path / "run")
    first = launch_two_nodes(training_assets, output)
    assert all(f"Run: starting afresh: no complete checkpoint in {output}" in t for t in first)
    losses = logged_losses(output)
    assert losses[6] < losses[1] - 0.05, losses
    check_same_losses(losses, one_machine_losses)  # two machines of one process = one of two

    model_files = {"adapter_config.json", "adapter_model.safetensors", "config.json"}
    model_files |= {"non_lora_trainables.bin", "README.md"} | tokenizer_files
    run_files = {"checkpoint-3", "checkpoint-6", "run.lock", "run_complete.json"}
    assert files_in(output) == run_files | model_files | {"trainer_state.json", "training_args.bin"}
    checkpoint = os.path.join(output, "checkpoint-3")
    assert files_in(checkpoint) == model_files | {
        "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json",
        "training_args.bin", "run_flags.json", COMPLETE_MARKER, "latest", "global_step3",
    }  # fmt: skip
    shards = shard_names()
    assert set(os.listdir(os.path.join(checkpoint, "global_step3"))) == shards
    assert {os.path.join("global_step3", n) for n in shards} <= set(marked_sizes(checkpoint))

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(checkpoint, os.path.join(resumed, "checkpoint-3"))
    second = launch_two_nodes(training_assets, resumed)
    start = f"Run: resuming from {os.path.join(resumed, 'checkpoint-3')} at step 3"
    assert all(start in text for text in second)
    assert all(text.count("'loss':") == 3 for text in second)  # steps 1-3 were not redone
    again = logged_losses(resumed)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), (step, again)


@pytest.mark.slow
def test_lora_stage_on_two_nodes_with_the_deepspeed_launcher_and_a_hostfile(
    training_assets, one_machine_losses, tmp_path
):
    """Each "machine" runs the script itself: deepspeed --hostfile --no_ssh --node_rank (as
    scripts/slurm/node.sh does); the hostfile names this machine twice, by two names."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    output = str(tmp_path / "run")
    logs = launch_two_nodes(training_assets, output, LAUNCHER="deepspeed", HOSTFILE=str(hostfile))
    for node, log in enumerate(logs):  # the launcher's command for this machine
        assert "deepspeed.launcher.launch --world_info=" in log and f"--node_rank={node}" in log
    check_same_losses(logged_losses(output), one_machine_losses)
    for step in (3, 6):
        checkpoint = os.path.join(output, f"checkpoint-{step}")
        shards = shard_names()
        assert set(os.listdir(os.path.join(checkpoint, f"global_step{step}"))) == shards
        assert {os.path.join(f"global_step{step}", n) for n in shards} <= set(
            marked_sizes(checkpoint)
        )
