"""Run a function over shares of work in forked processes and collect the results in order.

Used to build a large dataset on every CPU of the process: each child inherits the parent's
state (tokenizer, records) by fork, without pickling it, works on its share and sends back a
small result through a pipe. An error in a child is raised in the parent with the child's
traceback. Where fork is not available (or one share is asked for), the shares run in this
process, one after the other.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

S = TypeVar("S")
R = TypeVar("R")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the platform says)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def contiguous_shares(count: int, shares: int) -> list[range]:
    """range(count) cut into `shares` contiguous, nearly equal, non-empty ranges, in order."""
    shares = max(1, min(shares, count))
    bounds = [count * k // shares for k in range(shares + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(shares)]


class ChildFailed(RuntimeError):
    """A forked child raised; the message holds its traceback."""


def one_thread_each() -> None:
    """In a child, one of as many as there are CPUs: torch's intra-op pool (a processor's image
    probes run torch ops) would otherwise start a thread per CPU in every child. The
    tokenizers library turns its own pool off in a forked child by itself."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def child_main(function: Callable[[Any], Any], share: Any, connection: Any) -> None:
    one_thread_each()
    try:
        result = ("ok", function(share))
    except BaseException:  # sent to the parent, which raises it
        result = ("error", traceback.format_exc())
    connection.send(result)
    connection.close()


def map_forked(function: Callable[[S], R], shares: Sequence[S]) -> list[R]:
    """[function(share) for share in shares], each share in its own forked child at once."""
    if len(shares) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [function(share) for share in shares]
    context = multiprocessing.get_context("fork")
    children = []
    for share in shares:
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=child_main, args=(function, share, sender), daemon=True)
        child.start()
        sender.close()
        children.append((child, receiver))
    results, failures = [], []
    try:
        for child, receiver in children:  # read before joining: a large result fills the pipe
            try:
                status, value = receiver.recv()
            except EOFError:
                status, value = "error", f"the child (pid {child.pid}) died without a result"
            if status == "error":
                failures.append(value)
            results.append(value)
    finally:
        for child, receiver in children:
            receiver.close()
            child.join()
    if failures:
        raise ChildFailed(
            f"{len(failures)} of {len(shares)} children failed; the first:\n" + failures[0]
        )
    return results
