"""Issue 28: ``saekit report`` ran the model, the SAE and the per-latent bookkeeping in one
thread, at a fraction of ``saekit cache``'s tokens/s; the model's forward now runs in a worker
thread, ahead of the consumer (as the cache harvests), with the same batches in the same order."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from saekit.report.collect import PREFETCH, lm_batches


def fake_setup(calls):
    """A harvesting set-up whose forward records the thread it ran in."""

    def forward(ids_BT, mask_BT):
        calls.append(threading.get_ident())
        return {"h": ids_BT.reshape(-1, 1).float() * 2}

    def harvester(token_filter):
        return forward

    token_filter = SimpleNamespace(mask=lambda ids_BT, mask_BT: ids_BT > 0)
    return SimpleNamespace(harvester=harvester, token_filter=token_filter, hook="h")


def test_the_model_forward_runs_ahead_in_a_worker_thread_with_the_same_batches():
    calls: list[int] = []
    contexts = [torch.arange(6).view(2, 3) + 10 * i for i in range(5)]
    batches = iter(lm_batches(fake_setup(calls), iter(contexts)))
    first = next(batches)
    deadline = time.monotonic() + 10
    while len(calls) < 1 + PREFETCH and time.monotonic() < deadline:
        time.sleep(0.01)
    # ran ahead of the consumer: PREFETCH batches queued, one more waiting for a free slot
    assert PREFETCH >= 1 and 1 + PREFETCH <= len(calls) <= 2 + PREFETCH
    rest = list(batches)
    assert threading.get_ident() not in calls  # never in the consumer's thread
    for (x_BTd, keep_BT, ids_BT), ids in zip([first, *rest], contexts, strict=True):
        assert torch.equal(ids_BT, ids) and torch.equal(keep_BT, ids > 0)
        assert torch.equal(x_BTd, (ids * 2).float().unsqueeze(-1))
