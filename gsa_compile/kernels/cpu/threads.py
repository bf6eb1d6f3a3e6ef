"""How many intra-op threads the CPU kernels use: at most one per batch row.

A decode call's work is small: codes scored for L keys, attention over the selected blocks only.
Split over torch's intra-op threads, every one of its small ops ends at a thread barrier; on a
machine other processes keep busy that barrier waits for a descheduled thread, which costs as
much as the op itself, many times per call. So a batch of B rows runs on at most B threads;
dense attention over the whole cache (one large op) keeps all of them."""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def at_most_threads(count: int):
    """torch's intra-op threads capped at `count` (at least 1) inside the block, then restored."""
    threads = torch.get_num_threads()
    if threads <= count:
        yield
        return
    torch.set_num_threads(max(count, 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def at_most_one_thread_per_row(kernel):
    """Wrap a CPU kernel whose first argument is [B, ...] so that it runs on at most B threads."""

    @functools.wraps(kernel)
    def run(query, *args, **kwargs):
        with at_most_threads(query.shape[0]):
            return kernel(query, *args, **kwargs)

    return run
