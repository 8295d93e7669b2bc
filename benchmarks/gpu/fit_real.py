"""Issue 26 on one GPU: a real-data Lightning fine-tune of a ViT with D2FT (budget 1.0 and 0.6, per-block CUDA
graphs) against plain timm at its best (eager or ``torch.compile``), the step table behind it, and a profile.

On the device (bare machine: torch, timm, lightning, torchmetrics; no ortools/hydra/scikit-learn; no
network), first prepare the data here and carry it::

    PYTHONPATH=. python benchmarks/gpu/fit_real.py prepare          # -> .gpu_data/fashion-mnist (~6 MiB)
    run(command="OUT=$OUT bash benchmarks/gpu/session.sh", carry=[".gpu_data"], timeout_s=560)

``session.sh`` calls the subcommands below; each adds its rows to ``$OUT/gpu_fit_real.json`` as it measures
them (see ``results.py``; copy it to ``benchmarks/results/gpu/gpu_fit_real.json`` by hand)::

    fit_real.py steps --model vit_small_patch16_224 --batch 64 --profile   # the step table (+ profile)
    fit_real.py fit --batch 64                                             # the Lightning fits

The fits: Fashion-MNIST (the first ``--samples`` official training images, validation on the first
``--val`` test images), 28 px uint8 batches resized to ``--img-size`` and 3 channels in the model's stem on
the GPU (``real_data.py``), ``vit_small_patch16_224`` (random init), bf16-mixed, fused AdamW, ``--epochs``
epochs, validation every epoch, one checkpoint at the end (``ModelCheckpoint``, inside the fit time).
``budget 1.0`` / ``budget 0.6``: ``ViTClassifier`` + ``D2FTCallback(budget, solver="dp")`` (real scores)
+ ``D2FTStrategy()`` (CUDA graphs on by default on CUDA). ``plain timm (best)``: the same timm model in a
plain LightningModule (Lightning's default strategy), trained through ``torch.compile`` in the fastest mode
of the step table (``--plain-mode auto``), validated eagerly (a compiled eval would recompile).

Each fit process first runs 3 untimed eager steps (the device's lazy initialisation), then the fits in the
order budget 1.0, budget 0.6, plain timm (best). Figures of a fit row: ``fit_seconds`` from
``on_train_start`` (after D2FT's scoring and solving, which happen in ``on_fit_start``) to ``on_fit_end``,
synchronised; ``scoring_seconds`` beside it (the callback's); ``step_ms`` the median interval between
training-batch starts inside the epochs after the first; ``first_epoch_s`` (its validation included);
``captures`` (``BlockGraphs.captures``, whole fit) and ``capture_seconds`` (spent capturing in the first
epoch); ``compile_seconds`` the wall time of the first 3 training steps of a compiled plain fit (compile and
graph recording included); ``peak_mib`` ``max_memory_allocated`` from ``on_train_start`` plus the free part
of the D2FT graph pools at the end (``graph_pool_mib``: the whole pools); ``step_ratio`` the step over
``plain timm (best)``'s step in a fit of the same batch size.

``--smoke`` (any subcommand): a CPU rehearsal with the same code paths and JSON keys, tiny sizes (32 px,
batches 4 and 8 standing for 64 and 256, 2 blocks, one epoch, 32-true, compile through dynamo's ``eager``
backend, the CUDA-graph executor through its CPU stand-in). Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_profile
import real_data
import results
import steps
from results import PLAIN_BEST, SMOKE_BATCHES, row

from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.data.micro_batches import micro_batch_loader
from lightning_d2ft.model.cuda_graphs import StandInBackend, graph_pool_mib
from lightning_d2ft.strategy.strategy import D2FTStrategy

RESULTS_FILE = "gpu_fit_real.json"
PROFILE_FILE = "gpu_profile.json"


# -- arguments ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Issue 26 on one GPU: the step table, the real-data fits, "
                                     "the profile (see the module docstring)")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the Fashion-MNIST subset to carry")
    prep.add_argument("--train", type=int, default=12800)
    prep.add_argument("--test", type=int, default=2000)
    prep.add_argument("--dest", type=Path, default=real_data.DATA)
    sub.add_parser("show", help="print the session's table and targets so far").add_argument(
        "--out", type=Path, default=Path("."))
    _steps_args(_shared_args(sub.add_parser("steps", help="the bare step table (and the profile)")))
    _fit_args(_shared_args(sub.add_parser("fit", help="the Lightning fine-tunes")))
    args = parser.parse_args(argv)
    return _sized(args) if args.command in ("steps", "fit") else args


def _shared_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=64, help="64 or 256 (the smoke maps them to 4 and 8)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--subnets", type=int, default=74)
    p.add_argument("--out", type=Path, default=Path("."), help="folder of the JSON files ($OUT)")
    p.add_argument("--smoke", action="store_true", help="the CPU rehearsal (tiny sizes)")
    return p


def _steps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=list(steps.PLAIN_MODES),
                   help="plain timm modes; 'auto': eager and the fastest compile mode of the ViT-S table")
    p.add_argument("--profile", action="store_true", help="then profile budget 0.6 vs plain timm (best)")


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=5120, help="training images (5120: 80 batches of 64, 20 of 256)")
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--budgets", type=float, nargs="*", default=[1.0, 0.6])
    p.add_argument("--plain-mode", default="auto", help="auto (the step table's fastest), eager, "
                   "reduce-overhead, default or none")


def _sized(args: argparse.Namespace) -> argparse.Namespace:
    """The smoke's tiny sizes: 2 blocks of 6 head groups (subnets 2 x 6 + stem + head), 32 px, stand-in
    batches, 2 rounds or 8 micro-batches x 1 epoch."""
    args.depth = None
    if args.smoke:
        args.batch, args.img_size, args.depth, args.subnets = SMOKE_BATCHES[args.batch], 32, 2, 14
        if args.command == "steps":
            args.rounds = min(args.rounds, 2)
        else:
            args.samples, args.val, args.epochs = 8 * args.batch, min(args.val, 16), 1
    return args


# -- the step table -------------------------------------------------------------------------------------------
def auto_modes(path: Path, smoke: bool) -> list[str]:
    """Eager and the fastest compile mode of the ViT-S/16 batch-64 step table (if it measured one)."""
    batch = SMOKE_BATCHES[64] if smoke else 64
    timed = [r for r in results.load_rows(path) if r["level"] == "step" and r["batch"] == batch
             and r["model"] == "vit_small_patch16_224" and r["case"].startswith("plain timm (compile")
             and r["step_ms"] is not None]
    return ["eager"] + ([min(timed, key=lambda r: r["step_ms"])["mode"]] if timed else [])


def run_steps(args: argparse.Namespace) -> None:
    """Warm up and time every case, save the rows, then (``--profile``) profile budget 0.6 vs the best."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    path = args.out / RESULTS_FILE
    modes = auto_modes(path, args.smoke) if args.modes == ["auto"] else args.modes
    print(f"steps: {args.model}, batch {args.batch}, {args.img_size} px, modes {modes}, on {device}", flush=True)
    vit, x, y = steps.inputs(args.model, args.batch, args.img_size, device, args.depth)
    cases = steps.base_cases(vit, x, y, args.subnets, args.smoke)
    note = {"compile": "smoke: torch.compile(backend='eager') on CPU, not inductor"} if args.smoke else {}
    for mode in [None] + [m for m in modes if m != "eager"]:  # save a table after each compile
        if mode is not None:
            cases.append(steps.plain_case(vit, mode, x, y, args.smoke))
            print(f"  {cases[-1].name}: warm-up {_fmt(cases[-1].compile_seconds)} s", flush=True)
        steps.retime(cases, args.rounds)
        rows = steps.rows_of(cases, args.model, args.batch, args.img_size)
        results.save(path, rows, args.smoke, note)
    results.show(path, rows)
    if args.profile:
        profile_cases(cases, args, device)


def profile_cases(cases: list[steps.Case], args: argparse.Namespace, device: torch.device) -> None:
    """One profiled step of budget 0.6 and of plain timm (best): top kernels and category shares."""
    best, d2ft = steps.best_case(cases), next(c for c in cases if c.name == "budget 0.6")
    chosen = {f"budget 0.6 ({d2ft.mode})": d2ft}
    if best is not None:
        chosen[f"{PLAIN_BEST}: {best.name}"] = best
    profiles = {name: kernel_profile.profile_step(case.step, device.type == "cuda")
                for name, case in chosen.items() if case.step is not None}
    kernel_profile.print_profiles(profiles)
    results.write_json(str((args.out / PROFILE_FILE).resolve()), {
        "model": args.model, "batch": args.batch, "rule": kernel_profile.__doc__, "profiles": profiles},
        device=device)


# -- the Lightning fits ---------------------------------------------------------------------------------------
class Probe(Callback):
    """Fit time after scoring, the first epoch, batch-start intervals, warm-up, graph captures and memory."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.start = self.seconds = self.first_epoch = self.capture_first_epoch = 0.0
        self.warmup: float | None = None
        self.starts: list[tuple[int, float]] = []  # (epoch, perf_counter) of every training batch

    @staticmethod
    def _now() -> float:
        steps.sync()
        return time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        net = getattr(pl_module, "net", None)
        if self.smoke and hasattr(net, "use_cuda_graphs"):  # rehearse the graph executor on CPU
            net.use_cuda_graphs(True, backend=StandInBackend())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = self._now()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == 3 and self.warmup is None:
            self.warmup = self._now() - self.start  # the first 3 steps: compile + recording for plain timm
        self.starts.append((trainer.current_epoch, time.perf_counter()))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.first_epoch = self._now() - self.start
            graphs = getattr(getattr(pl_module, "net", None), "graphs", None)
            self.capture_first_epoch = graphs.capture_seconds if graphs is not None else 0.0

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds = self._now() - self.start

    def step_ms(self) -> float | None:
        """Median interval between batch starts inside one epoch, epochs after the first (a one-epoch smoke:
        from its third batch); a gap across epochs would hold validation."""
        first = 1 if any(e > 0 for e, _ in self.starts) else 0
        kept = [(e, t) for e, t in self.starts if e >= first][2 if first == 0 else 0:]
        gaps = [b - a for (ea, a), (eb, b) in itertools.pairwise(kept) if ea == eb]
        return 1e3 * statistics.median(gaps) if gaps else None


class PlainClassifier(LightningModule):
    """Plain timm in Lightning: trained through ``torch.compile`` in ``mode`` (or eagerly), evaluated eagerly."""

    def __init__(self, vit: torch.nn.Module, mode: str, lr: float, smoke: bool) -> None:
        super().__init__()
        self.net, self.mode, self.lr, self.smoke = vit, mode, lr, smoke
        self.__dict__["compiled"] = None  # not a submodule: the checkpoint holds the weights once
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.__dict__["compiled"] is None:
            self.__dict__["compiled"] = steps.compiled(self.net, self.mode, self.smoke)
        if self.mode == "reduce-overhead" and not self.smoke:
            torch.compiler.cudagraph_mark_step_begin()
        x, y = batch
        loss = F.cross_entropy(self.__dict__["compiled"](x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self.net(x), y)
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05, fused=True)  # as ViTClassifier


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """The fixed micro-batches of the training subset, and the validation subset."""
    train = real_data.Batched(*real_data.load("train", args.samples))
    val = real_data.Batched(*real_data.load("test", args.val))
    return (micro_batch_loader(train, args.batch, seed=0, collate_fn=real_data.as_batch),
            DataLoader(val, batch_size=args.batch, collate_fn=real_data.as_batch))


def trainer_for(args: argparse.Namespace, root: Path, callbacks: list[Callback], strategy) -> Trainer:
    """One device, validation every epoch, one checkpoint at the end; no logger, bar or summary."""
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", every_n_epochs=args.epochs)
    return Trainer(accelerator="cpu" if args.smoke else "gpu", devices=1, strategy=strategy,
                   precision="32-true" if args.smoke else "bf16-mixed", callbacks=[*callbacks, ckpt],
                   max_epochs=args.epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=root, num_sanity_val_steps=0)


def fit_row(args: argparse.Namespace, case: str, mode: str, trainer: Trainer, probe: Probe, module) -> dict:
    """The fit's figures (see the module docstring)."""
    graphs = getattr(module.net, "graphs", None)
    pool, free = graph_pool_mib(graphs)
    ckpts = sorted((Path(trainer.default_root_dir) / "checkpoints").glob("*.ckpt"))
    d2ft = next((c for c in trainer.callbacks if isinstance(c, D2FTCallback)), None)
    peak = torch.cuda.max_memory_allocated() / 2**20 + free if torch.cuda.is_available() else None
    return row(level="fit", case=case, model=args.model, batch=args.batch, img_size=args.img_size, mode=mode,
               fit_seconds=probe.seconds, first_epoch_s=probe.first_epoch, step_ms=probe.step_ms(),
               captures=graphs.captures if graphs is not None else None,
               capture_seconds=probe.capture_first_epoch if graphs is not None else None,
               scoring_seconds=d2ft.scoring_seconds if d2ft is not None else None,
               compile_seconds=probe.warmup if mode not in ("eager",) and d2ft is None else None,
               peak_mib=peak, graph_pool_mib=pool if graphs is not None and torch.cuda.is_available() else None,
               steps=trainer.global_step,
               epochs=trainer.current_epoch, samples=len(trainer.train_dataloader.dataset),
               val_acc=float(trainer.callback_metrics["val/acc"]) if "val/acc" in trainer.callback_metrics else None,
               checkpoint_mib=ckpts[-1].stat().st_size / 2**20 if ckpts else None,
               error=graphs.failure if graphs is not None else None)


def model_kwargs(args: argparse.Namespace) -> dict:
    """timm's keyword arguments: the image size, and the smoke's depth."""
    return {"img_size": args.img_size, **({"depth": args.depth} if args.depth else {})}


def fit_d2ft(args: argparse.Namespace, budget: float, root: Path) -> dict:
    """ViTClassifier + D2FTCallback(budget, solver="dp") + D2FTStrategy (CUDA graphs by default on CUDA)."""
    seed_everything(0)
    module = ViTClassifier(model=args.model, num_classes=10, subnets=args.subnets, lr=args.lr,
                           model_kwargs=model_kwargs(args))
    real_data.resize_on_input(module.net.vit, args.img_size)
    probe = Probe(args.smoke)
    trainer = trainer_for(args, root, [D2FTCallback(budget=budget, solver="dp", progress=False), probe],
                          D2FTStrategy())
    trainer.fit(module, *loaders(args))
    return fit_row(args, f"budget {budget}", d2ft_mode(args), trainer, probe, module)


def d2ft_mode(args: argparse.Namespace) -> str:
    """How the D2FT fit runs its blocks."""
    return "stand-in graphs (CPU)" if args.smoke else "cuda graphs per block"


def fit_plain(args: argparse.Namespace, mode: str, root: Path) -> dict:
    """Plain timm in Lightning in ``mode``."""
    seed_everything(0)
    vit = steps.new_vit(args.model, args.img_size, torch.device("cpu"), args.depth)
    module, probe = PlainClassifier(vit, mode, args.lr, args.smoke), Probe(args.smoke)
    trainer = trainer_for(args, root, [probe], "auto")
    trainer.fit(module, *loaders(args))
    return fit_row(args, PLAIN_BEST, mode, trainer, probe, module)


def plain_mode(args: argparse.Namespace) -> str | None:
    """The plain fit's mode: the step table's fastest for ViT-S batch 64 (``auto``; eager without a table)."""
    if args.plain_mode != "auto":
        return None if args.plain_mode == "none" else args.plain_mode
    batch = SMOKE_BATCHES[64] if args.smoke else 64
    best = [r for r in results.load_rows(args.out / RESULTS_FILE) if r["level"] == "step"
            and r["case"] == PLAIN_BEST and r["model"] == args.model and r["batch"] == batch]
    return best[0]["mode"] if best else "eager"


def run_fit(args: argparse.Namespace) -> None:
    """The budgets, then plain timm (best); each row saved as soon as it is measured."""
    path = args.out / RESULTS_FILE
    jobs = [("d2ft", b) for b in args.budgets] + ([("plain", plain_mode(args))] if plain_mode(args) else [])
    warm_device(args)
    done = []
    for kind, what in jobs:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            r = fit_or_error(args, kind, what, Path(tmp))
            print(f"  {r['case']} ({r['mode']}): fit {_fmt(r['fit_seconds'])} s, step {_fmt(r['step_ms'])} ms, "
                  f"{time.perf_counter() - start:.1f} s with setup and scoring", flush=True)
        results.save(path, [r], args.smoke)
        done.append(r)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results.show(path, done)


def warm_device(args: argparse.Namespace) -> None:
    """A few untimed eager steps of the plain model first, so that the first timed fit of the process does not
    pay alone for the device's lazy initialisation (cuBLAS handles, the patch-embed convolution's algorithm)."""
    device = torch.device("cpu" if args.smoke else "cuda")
    vit, x, y = steps.inputs(args.model, args.batch, args.img_size, device, args.depth)
    case = steps.plain_case(vit, "eager", x, y, args.smoke)
    print(f"  device warm-up: {_fmt(case.compile_seconds)} s for 3 eager steps", flush=True)
    del vit, x, y, case
    gc.collect()


def fit_or_error(args: argparse.Namespace, kind: str, what, root: Path) -> dict:
    """One fit's row; a failure (a compile, a capture) is a row with ``error``, not the end of the session."""
    try:
        return fit_d2ft(args, what, root) if kind == "d2ft" else fit_plain(args, what, root)
    except Exception as err:
        traceback.print_exc()
        case = f"budget {what}" if kind == "d2ft" else PLAIN_BEST
        mode = d2ft_mode(args) if kind == "d2ft" else what
        return row(level="fit", case=case, model=args.model, batch=args.batch, img_size=args.img_size, mode=mode,
                   error=f"{type(err).__name__}: {str(err)[:300]}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*weights_only.*")
    if args.command == "prepare":
        for path in real_data.prepare(args.dest, args.train, args.test):
            print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
        return
    if args.command == "show":
        results.show(args.out / RESULTS_FILE)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run_steps(args) if args.command == "steps" else run_fit(args)


if __name__ == "__main__":
    main()
