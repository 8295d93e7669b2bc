"""Only FULL subnets learn, in real Lightning fits under D2FTStrategy (issue 25): in every optimizer step, a
head group that ran no FULL micro-batch in it is bit-identical afterwards (its Parameters and its optimizer
state), and one FULL in any of the step's accumulated micro-batches is updated. With gradient accumulation and
clipping, on 1 process, on 2 tensor-parallel processes under bf16-mixed, and in 2 lo-fi replicas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fits import d2ft_callback, digits_data, make_module, make_trainer
from lightning.pytorch import Callback

from lightning_d2ft.model.grouped import GroupedLinear
from lightning_d2ft.model.vit import find_d2ft
from lightning_d2ft.ops import Op

pytestmark = pytest.mark.timeout(900)


class UpdateAudit(Callback):
    """Per optimizer step, on this rank: for each head group it holds, whether the group ran FULL in any of
    the step's micro-batches, and whether its Parameters and its optimizer state changed in the step."""

    def __init__(self, out: Path) -> None:
        self.out, self.step_ops, self.records, self.before = out, [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mb = trainer.strategy.micro_batch_of(batch_idx)
        self.step_ops.append(trainer.strategy.schedule.ops[mb].clone())

    def _groups(self, pl_module):
        net = find_d2ft(pl_module)
        for l, blk in enumerate(net.vit.blocks):
            for m in blk.modules():
                if isinstance(m, GroupedLinear):
                    for pos, g in enumerate(m.group_ids):
                        yield net.subnet_index(l, g), m.group_parameters([pos])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        def state(p):
            return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}

        self.before = [(column, [(p, p.detach().clone(), state(p)) for p in params])
                       for column, params in self._groups(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is None:
            return  # a micro-batch without an optimizer step (gradient accumulation)
        optimizer = trainer.optimizers[0]
        full = torch.stack(self.step_ops).eq(int(Op.FULL)).any(0)
        for column, params in self.before:
            moved = any(not torch.equal(p.detach(), was) for p, was, _ in params)
            state_changed = False
            for p, _, st in params:
                now = optimizer.state.get(p, {})
                state_changed |= set(now) != set(st) or any(
                    not torch.equal(now[k], v) if torch.is_tensor(v) else now[k] != v for k, v in st.items())
            self.records.append({"step": trainer.global_step, "column": column, "full": bool(full[column]),
                                 "moved": moved, "state_changed": state_changed,
                                 "micro_batches": len(self.step_ops)})
        self.before, self.step_ops = None, []

    def on_train_end(self, trainer, pl_module):
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def _audit(tmp_path: Path, devices: int, optimizer: str = "adamw", strategy_kw=None, **kw) -> list[dict]:
    out = tmp_path / "audit"
    module = make_module(optimizer=optimizer)
    trainer = make_trainer(tmp_path, devices=devices, strategy_kw=strategy_kw,
                           callbacks=[d2ft_callback(0.5, tmp_path), UpdateAudit(out)], limit_train_batches=6,
                           accumulate_grad_batches=2, gradient_clip_val=0.05, **kw)
    trainer.fit(module, digits_data())
    records = [r for rank in range(devices) for r in json.loads((out / f"rank{rank}.json").read_text())]
    assert {r["micro_batches"] for r in records} == {2}  # every step accumulated two micro-batches
    return records


def _check(records: list[dict]) -> None:
    skipped = [r for r in records if not r["full"]]
    trained = [r for r in records if r["full"]]
    assert skipped and trained, "the schedule must leave some groups out of a step and train others"
    assert not [r for r in skipped if r["moved"] or r["state_changed"]], "a group that ran no FULL changed"
    assert all(r["moved"] and r["state_changed"] for r in trained), "a group FULL in the step was not updated"


def test_one_process_adamw_with_accumulation_and_clipping(tmp_path):
    _check(_audit(tmp_path, devices=1))


def test_two_tensor_parallel_processes_under_bf16_mixed(tmp_path):
    records = _audit(tmp_path, devices=2, precision="bf16-mixed")
    _check(records)
    assert len({r["column"] for r in records}) == 12  # both ranks audited their own groups: all 12 between them


def test_two_lofi_replicas_with_sgd_momentum(tmp_path):
    _check(_audit(tmp_path, devices=2, optimizer="sgd", strategy_kw=dict(tensor_parallel_size=1,
                                                                         data_parallel="lofi")))
