"""How many intra-op threads the CPU kernels use: at most one per batch row.

A decode call's work is small: codes scored for L keys, attention over the selected blocks only.
Split over torch's intra-op threads, every one of its small ops ends at a thread barrier; on a
machine other processes keep busy that barrier waits for a descheduled thread, which costs as
much as the op itself, many times per call. So a batch of B rows runs on at most B threads;
dense attention over the whole cache (one large op) keeps all of them."""

from __future__ import annotations

import functools

import torch


def at_most_one_thread_per_row(kernel):
    """Wrap a CPU kernel whose first argument is [B, ...] so that it runs on at most B threads."""

    @functools.wraps(kernel)
    def run(query, *args, **kwargs):
        threads = torch.get_num_threads()
        rows = query.shape[0]
        if threads <= rows:
            return kernel(query, *args, **kwargs)
        torch.set_num_threads(max(rows, 1))
        try:
            return kernel(query, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run
