"""Start a training command on Gaudi cards through optimum-habana's DistributedRunner.

    python -m llava.train.gaudi_launch --world_size 8 [--use_deepspeed] [--master_port P] \
        [--hostfile H] -- llava/train/train.py --use_habana True ...

What optimum-habana's examples/gaudi_spawn.py does, kept in the package so the scripts need
no checkout of optimum-habana's examples.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from llava.train.gaudi import import_optimum_habana


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher options, the command to run) split at `--`."""
    if "--" not in argv:
        raise SystemExit("usage: gaudi_launch [options] -- SCRIPT [ARGS...]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world_size", type=int, default=1, help="Gaudi cards on this node")
    parser.add_argument("--use_deepspeed", action="store_true")
    parser.add_argument("--use_mpi", action="store_true")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--hostfile", default=None, help="multi-node runs (DeepSpeed)")
    options = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        raise SystemExit("gaudi_launch: no command after --")
    return options, command


def main(argv: list[str] | None = None) -> int:
    options, command = parse_arguments(sys.argv[1:] if argv is None else argv)
    import_optimum_habana()  # a clear error when the Habana stack is missing
    from optimum.habana.distributed import DistributedRunner

    runner = DistributedRunner(
        command_list=[shlex.join(command)],
        world_size=options.world_size,
        hostfile=options.hostfile,
        use_mpi=options.use_mpi,
        use_deepspeed=options.use_deepspeed,
        master_port=options.master_port,
    )
    return runner.run() or 0


if __name__ == "__main__":
    sys.exit(main())
