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


def _sync_worker(rank: int, port: int, out) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    params[0].grad = torch.full((3,), float(rank + 1))  # both replicas trained it
    if rank == 0:
        params[1].grad = torch.full((3,), 4.0)  # only replica 0 trained it
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    replicas = SyncReplicas(None, 2, rank)
    replicas.after_backward(opt)
    out[rank] = [None if p.grad is None else p.grad.tolist() for p in params], replicas.bytes_sent
    dist.destroy_process_group()


def test_sync_replicas_average_what_some_replica_trained_and_leave_the_rest_without_a_gradient():
    """A parameter no replica trained (a head group FULL nowhere in the step) keeps grad=None everywhere, so the
    optimizer skips it; one trained on some replica gets the mean (zeros from the others)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sync_worker, args=(port, out), nprocs=2, join=True)
        out = dict(out)
    for rank in range(2):
        grads, sent = out[rank]
        assert grads == [[1.5] * 3, [2.0] * 3, None]
        assert sent == 3 + 2 * 3 * 4  # the flags (one byte each), then the two trained gradients in one buffer
