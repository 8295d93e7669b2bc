"""launchers: which errors only echo a peer's failure (and so wait for the peer's real error)."""

from __future__ import annotations

from lightning_d2ft.parallel.collectives import CollectiveError
from lightning_d2ft.strategy.launchers import is_peer_error


def test_peer_errors_are_recognised_through_the_cause_chain():
    assert is_peer_error(RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:5"))
    assert is_peer_error(CollectiveError("collective 'x' failed on rank 1"))
    wrapped = ValueError("outer")
    wrapped.__cause__ = RuntimeError("Timed out waiting 5000ms for recv operation to complete")
    assert is_peer_error(wrapped)
    assert not is_peer_error(ValueError("use subnets in {14, 26, 38}"))
