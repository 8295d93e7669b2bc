"""Per-block graph keys on a real-data schedule, in a Lightning fit (issue 26).

A one-device fit on the bundled digits, scored (squared gradient / per-sample Fisher) and solved by
D2FTCallback, with the CPU stand-in capture backend in place of CUDA graphs: the micro-batches get many
distinct rows of ops, yet the captures stay within the model's bound ``depth * G (G + 1) / 2`` (and below
the distinct rows, which a row-keyed executor captured), and the weights after the epoch equal those of the
same fit run eagerly (the stand-in replays on the static buffers, so a wrong gather or gradient route would
show).
"""

from __future__ import annotations

import pytest
import torch
from fits import digits_data, make_module, make_trainer
from lightning.pytorch import Callback

from lightning_d2ft import D2FTCallback
from lightning_d2ft.model.cuda_graphs import StandInBackend, block_keys
from lightning_d2ft.model.vit import find_d2ft

pytestmark = pytest.mark.timeout(600)


class StandInGraphs(Callback):
    """Turns the stand-in graphs on once the strategy has set the model up (it turns real ones off on CPU)."""

    def on_train_start(self, trainer, pl_module):
        find_d2ft(pl_module).use_cuda_graphs(backend=StandInBackend())


def _fit(tmp_path, graphs: bool):
    module = make_module(optimizer="sgd")
    # data-dependent scores for both ops (weight_magnitude, the default backward score, is the same for every
    # micro-batch): nearly one row of ops per micro-batch, as the paper's scores give
    callback = D2FTCallback(budget=0.6, backward_score="squared_gradient", forward_score="fisher",
                            cache_dir=tmp_path / "cache", progress=False)
    callbacks = [callback, StandInGraphs()] if graphs else [callback]
    make_trainer(tmp_path / ("graphs" if graphs else "eager"), devices=1, callbacks=callbacks).fit(
        module, datamodule=digits_data())
    return find_d2ft(module), callback.schedule


def test_a_digits_schedule_captures_within_the_bound_and_trains_as_eager(tmp_path, caplog):
    with caplog.at_level("INFO"):
        net, schedule = _fit(tmp_path, graphs=True)
    assert f"stand-in graphs: {net.graphs.captures} block keys captured in" in caplog.text
    eager, eager_schedule = _fit(tmp_path, graphs=False)
    assert torch.equal(schedule.ops, eager_schedule.ops)
    G = net.groups_per_block
    bound = net.depth * G * (G + 1) // 2
    micro_batches = schedule.ops.shape[0]
    print(f"digits schedule: {micro_batches} micro-batches, {schedule.distinct_patterns} distinct rows, "
          f"{net.graphs.captures} block captures (bound {bound})")
    assert schedule.distinct_patterns > 1  # keyed by rows, each would be a whole-model capture
    assert net.graphs.failure is None
    assert net.graphs.keys == block_keys(schedule.ops, G)
    assert net.graphs.captures == len(net.graphs.keys) <= min(bound, net.depth * schedule.distinct_patterns)
    for (name, a), b in zip(eager.named_parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
