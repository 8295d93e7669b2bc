"""replicas: one replica is a no-op for both kinds; two lo-fi replicas train apart and average their weights
(every n steps and at the end), evaluation sees their mean without changing them; two synced replicas
average their gradients. The two-replica cases run two gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _two_replicas(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out[rank] = {**{kind: _three_steps(rank, kind) for kind in ("lofi", "sync")}, "partial": _partial_sync(rank)}
    finally:
        dist.destroy_process_group()


def _three_steps(rank: int, kind: str) -> dict:
    p = torch.nn.Parameter(torch.full((4,), float(rank)))  # the replicas start apart: 0 and 1
    opt = torch.optim.SGD([p], lr=1.0)
    replicas = make_replicas(kind, None, 2, rank, every=2 if kind == "lofi" else None)
    seen = []
    for _ in range(3):
        p.grad = torch.full((4,), float(rank + 1))  # replica 0 sees gradient 1, replica 1 sees 2
        replicas.after_backward(opt)
        opt.step()
        replicas.after_step([p])
        seen.append(p.detach().clone())
    own = p.detach().clone()
    replicas.evaluate_mean_([p])
    mean = p.detach().clone()
    replicas.resume_own_([p])
    return {"steps": seen, "eval": mean, "after_eval": p.detach().clone(), "own": own, "bytes": replicas.bytes_sent}


def _partial_sync(rank: int) -> tuple[list, int]:
    """Three parameters: trained on both replicas, on replica 0 only, on neither (a group FULL nowhere)."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    params[0].grad = torch.full((3,), float(rank + 1))
    if rank == 0:
        params[1].grad = torch.full((3,), 4.0)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    replicas = SyncReplicas(None, 2, rank)
    replicas.after_backward(opt)
    return [None if p.grad is None else p.grad.tolist() for p in params], replicas.bytes_sent


@pytest.fixture(scope="module")
def two_replicas() -> dict:
    """Both kinds, three steps each, in one pair of gloo processes: {rank: {kind: what it saw}}."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_two_replicas, args=(port, out), nprocs=2, join=True)
    return dict(out)


def test_two_lofi_replicas_train_apart_and_average_every_n_steps_and_evaluate_their_mean(two_replicas):
    r0, r1 = two_replicas[0]["lofi"], two_replicas[1]["lofi"]
    # step 1: no communication, each replica moved by its own gradient (0 - 1, 1 - 2)
    assert torch.equal(r0["steps"][0], torch.full((4,), -1.0)) and torch.equal(r1["steps"][0], torch.full((4,), -1.0))
    # step 2 (every=2): both replaced by their mean ((0-2) + (1-4)) / 2 = -2.5
    assert torch.equal(r0["steps"][1], torch.full((4,), -2.5)) and torch.equal(r1["steps"][1], r0["steps"][1])
    # step 3: apart again
    assert torch.equal(r0["own"], torch.full((4,), -3.5)) and torch.equal(r1["own"], torch.full((4,), -4.5))
    # evaluation sees the mean (-4.0) and gives each replica its own weights back
    assert torch.equal(r0["eval"], torch.full((4,), -4.0)) and torch.equal(r1["eval"], r0["eval"])
    assert torch.equal(r0["after_eval"], r0["own"]) and torch.equal(r1["after_eval"], r1["own"])
    assert r0["bytes"] > 0  # the averages (and only they) cost bytes


def test_two_synced_replicas_step_with_the_mean_gradient(two_replicas):
    for r in (0, 1):  # gradient mean 1.5 every step, from starts 0 and 1
        assert torch.equal(two_replicas[r]["sync"]["own"], torch.full((4,), float(r) - 4.5))
    assert torch.equal(two_replicas[0]["sync"]["eval"], two_replicas[0]["sync"]["own"])  # in sync: nothing to average


def test_sync_replicas_average_what_some_replica_trained_and_leave_the_rest_without_a_gradient(two_replicas):
    """A parameter no replica trained (a head group FULL nowhere in the step) keeps grad=None everywhere, so the
    optimizer skips it; one trained on some replica gets the mean (zeros from the others)."""
    for rank in range(2):
        grads, sent = two_replicas[rank]["partial"]
        assert grads == [[1.5] * 3, [2.0] * 3, None]
        assert sent == 3 + 2 * 3 * 4  # the flags (one byte each), then the two trained gradients in one buffer
