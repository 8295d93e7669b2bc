"""guards: the per-step agreement on one rank, and the SIGTERM message."""

from __future__ import annotations

import types

import pytest
import torch

from lightning_d2ft.strategy.step_guard import StepGuard, sigterm_message


def test_agree_flags_input_before_loss_and_carries_sigterm():
    guard = StepGuard()
    good = (torch.ones(2), torch.tensor([1]))
    assert guard.agree(good, torch.tensor(1.0), 1, 0) == ("", False)
    assert guard.agree(good, torch.tensor(float("nan")), 1, 0) == ("loss", False)
    bad = (torch.tensor([1.0, float("inf")]), torch.tensor([1]))
    assert guard.agree(bad, torch.tensor(float("nan")), 1, 0) == ("input", False)
    guard.sigterm_seen = True
    assert guard.agree(good, torch.tensor(1.0), 1, 0) == ("", True)


def test_sigterm_message_names_the_newest_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    old, new = tmp_path / "a.ckpt", tmp_path / "last.ckpt"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    import os

    os.utime(old, (1, 1))
    cb = ModelCheckpoint(dirpath=tmp_path)
    cb.best_model_path, cb.last_model_path = str(old), str(new)
    trainer = types.SimpleNamespace(callbacks=[cb], global_step=7)
    message = sigterm_message(trainer)
    assert message == f"D2FT: stopped by SIGTERM at global step 7; resume from {new}"
    assert "\n" not in message
    assert "no checkpoint" in sigterm_message(types.SimpleNamespace(callbacks=[], global_step=1))


def test_deferred_agreement_answers_for_the_previous_step_and_settles_the_last():
    guard = StepGuard()
    good, nan = (torch.ones(2), torch.tensor([1])), torch.tensor(float("nan"))
    assert guard.settle() == ("", False, {})
    assert guard.agree_deferred(good, nan, 1, 0, {"global_step": 0}) == ("", False, {})  # nothing queued before
    previous = guard.agree_deferred(good, torch.tensor(1.0), 1, 0, {"global_step": 1})
    assert previous == ("loss", False, {"global_step": 0})
    guard.sigterm_seen = True
    bad = (torch.tensor([float("inf")]), torch.tensor([1]))
    assert guard.agree_deferred(bad, torch.tensor(1.0), 1, 0, {"global_step": 2}) == ("", False, {"global_step": 1})
    assert guard.settle() == ("input", True, {"global_step": 2})
    assert guard.settle() == ("", False, {})
    guard.agree_deferred(bad, nan, 1, 0, {"global_step": 3})
    guard.discard()
    assert guard.settle() == ("", False, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deferred_agreement_on_cuda_reads_pinned_flags_after_their_event():
    guard = StepGuard()
    good = (torch.ones(2, device="cuda"), torch.tensor([1], device="cuda"))
    nan = torch.tensor(float("nan"), device="cuda")
    guard.agree_deferred(good, nan, 1, 0, {"global_step": 0})
    assert guard._pending[0].is_pinned() and guard._pending[1] is not None
    previous = guard.agree_deferred(good, torch.ones((), device="cuda"), 1, 0, {"global_step": 1})
    assert previous == ("loss", False, {"global_step": 0})
    assert guard.settle() == ("", False, {"global_step": 1})
