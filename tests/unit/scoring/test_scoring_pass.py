"""The scoring pass: streamed from the training loader, vectorised sums, the same numbers as compute_scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_d2ft import D2FTViT
from lightning_d2ft.data.micro_batches import micro_batch_loader
from lightning_d2ft.scoring.scores import compute_scores, data_fingerprint
from lightning_d2ft.scoring.scoring_pass import SubnetIndex, micro_batches_to_train, score_shared, scoring_loader


class _Recorded(Dataset):
    """Random images that record every sample read."""

    def __init__(self, n: int = 24) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 5, (n,), generator=gen)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads.append(i)
        return self.x[i], self.y[i]


def test_scoring_starts_before_the_data_set_has_been_read(make_vit):
    data = _Recorded()
    loader = micro_batch_loader(data, 4, seed=0)
    net = D2FTViT(make_vit("tiny3"))
    seen_at_first_loss = []

    def loss_fn(out, y):
        if not seen_at_first_loss:
            seen_at_first_loss.append(len(data.reads))
        return F.cross_entropy(out, y)

    ids = list(range(6))
    score_shared(net, loader, loader.sampler.micro_batches, ids, ["sq"], loss_fn)
    assert seen_at_first_loss == [4]  # one micro-batch read, the other 20 samples not yet
    assert sorted(data.reads) == sorted(i for mb in loader.sampler.micro_batches for i in mb)  # each once


def test_the_streamed_pass_gives_compute_scores_numbers_and_only_the_asked_micro_batches(make_vit):
    data = _Recorded()
    loader = micro_batch_loader(data, 4, seed=0)
    mbs = loader.sampler.micro_batches
    net = D2FTViT(make_vit("tiny3"))
    sums, losses, weights = score_shared(net, loader, mbs, [1, 4], ["abs", "sq", "taylor", "fisher"],
                                         F.cross_entropy)
    batches = [(data.x[mb], data.y[mb]) for mb in mbs]
    for j, metric in enumerate(("gradient_magnitude", "squared_gradient", "taylor", "fisher")):
        ref = compute_scores(net, batches, metric, metric, progress=False).backward
        assert torch.allclose(sums[:, j], ref[[1, 4]], rtol=1e-5)
    assert torch.allclose(losses, torch.stack([F.cross_entropy(net.vit.eval()(x), y) for x, y in
                                               (batches[1], batches[4])]).double(), rtol=1e-5)
    assert torch.allclose(weights, compute_scores(net, batches, "weight_magnitude", "random").backward[0])


def test_the_loader_keeps_the_training_loaders_collate_and_workers():
    data = _Recorded(8)
    train = micro_batch_loader(data, 2, seed=0, num_workers=1, collate_fn=lambda items: ("mine", len(items)))
    streamed = scoring_loader(train, [[0, 1], [5, 6]])
    assert streamed.num_workers == 1 and list(streamed) == [("mine", 2), ("mine", 2)]


def test_the_data_fingerprint_reads_a_sample_not_the_data_set():
    data = _Recorded(200)
    mbs = [list(range(i, i + 4)) for i in range(0, 200, 4)]
    key = data_fingerprint(data, mbs, seed=0)
    assert len(data.reads) == 16
    assert data_fingerprint(data, mbs, seed=0) == key
    assert data_fingerprint(data, mbs[::-1], seed=0) != key  # another micro-batch split
    data.x[data.reads[0]] += 1  # a sampled image changes
    assert data_fingerprint(data, mbs, seed=0) != key


def test_every_grouped_tensor_is_indexed_once_and_shared_tensors_not_at_all(make_vit):
    net = D2FTViT(make_vit("vit_s16"), subnets=74)
    names = [name for name, *_ in SubnetIndex(net).pieces]
    assert len(names) == len(set(names))
    assert not any(s in n for n in names if n.startswith("blocks.") for s in ("norm", "proj.bias", "fc2.bias"))
    # qkv w/b, proj w, fc1 w/b, fc2 w of each of the 6 head groups of each block: one Parameter each
    assert sum("blocks." in n for n in names) == 12 * 6 * 6


def _trainer(batches=float("inf"), max_steps=-1, accumulate=1, max_epochs=1):
    import types

    return types.SimpleNamespace(num_training_batches=batches, max_steps=max_steps, accumulate_grad_batches=accumulate,
                                 max_epochs=max_epochs, current_epoch=0)


def test_only_the_micro_batches_a_fit_will_train_are_chosen():
    from lightning_d2ft.data.micro_batches import MicroBatchSampler

    sampler = MicroBatchSampler(list(range(40)), 4, seed=0)  # 10 micro-batches
    order = sampler.micro_batch_ids(0)
    assert micro_batches_to_train(_trainer(), sampler) == list(range(10))
    assert micro_batches_to_train(_trainer(batches=3), sampler) == sorted(order[:3])  # limit_train_batches=3
    assert micro_batches_to_train(_trainer(max_steps=2, accumulate=2, max_epochs=5), sampler) == sorted(order[:4])
    two_epochs = micro_batches_to_train(_trainer(batches=2, max_epochs=2), sampler)
    assert two_epochs == sorted(set(order[:2]) | set(sampler.micro_batch_ids(1)[:2]))
    sampler.set_replicas(2, 1)  # data-parallel: every replica's share, whichever replica asks
    assert micro_batches_to_train(_trainer(batches=1), sampler) == sorted(order[:2])
