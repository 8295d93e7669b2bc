"""replicas: one replica is a no-op for both kinds; lo-fi counts steps toward its averages."""

from __future__ import annotations

import torch

from lightning_d2ft.parallel.replicas import LofiReplicas, SyncReplicas, make_replicas


def test_one_replica_changes_nothing_and_sends_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    opt = torch.optim.SGD([p], lr=0.1)
    for kind in ("sync", "lofi"):
        replicas = make_replicas(kind, None, 1, 0, every=1 if kind == "lofi" else None)
        replicas.after_backward(opt)
        replicas.after_step([p])
        assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(replicas.mean(p.data), p.data)
        assert replicas.bytes_sent == 0 and not replicas.differ
    assert isinstance(make_replicas("sync", None, 1, 0), SyncReplicas)
    assert isinstance(make_replicas("lofi", None, 1, 0), LofiReplicas)
