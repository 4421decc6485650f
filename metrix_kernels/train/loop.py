"""The training loop: one Config in, checkpoints every epoch, results (JSON, markdown, plots) out.

Determinism: batch order is a function of (seed, epoch) (sampling.py), lam and the pair set come
from a dedicated generator, and a checkpoint holds every RNG state, so ``resume`` continues to the
same numbers as an uninterrupted run on the CPU.

Under torchrun (``init_distributed``), batch_size is the global batch: each rank trains on its slice
(sampling.py), the model runs under DistributedDataParallel and the loss gathers the global batch
(MetrixLoss(process_group="world")), so the update is that of one process on the whole batch,
except where layers depend on the batch (BatchNorm in training mode normalizes each rank's slice).
Rank 0 alone evaluates, logs, writes checkpoints and results.
"""
from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import metrics
from ..api import MetrixLoss, plan_mixing
from ..distributed import gather
from ..family import loss_row
from ..pairs import batch_pairs
from ..reference import pool
from . import data, report
from .model import build_model
from .reservoir import MixedReservoir
from .sampling import BalancedBatchSampler, RandomBatchSampler

# Settings that may change when resuming; everything else comes from the checkpoint.
RUNTIME_FIELDS = ("out", "progress", "stop_after_epoch", "workers", "device")
LOG_NAME = "train.log"


@dataclass
class Config:
    dataset: str = "digits"
    data_root: Optional[str] = None
    out: str = "runs/digits"
    loss: str = "multi_similarity"
    loss_params: dict = field(default_factory=dict)
    method: str = "metrix"  # name recorded in the results (baseline, metrix, mochi-..., i-mix)
    mixup: Optional[str] = "feature"
    pairs: str = "pos-neg/anc-neg"
    label_mode: str = "interpolate"
    weight: float = 0.4
    mix_alpha: float = 2.0
    backend: str = "auto"
    hard_negatives: int = 3
    mix_hardest: bool = False  # embedding / feature mixup over the hardest negatives only (MoCHi)
    backbone: str = "digits"
    pretrained: Optional[str] = "none"
    embedding_size: int = 64
    image_size: int = 8
    batch_size: int = 60
    sampler: str = "random"
    samples_per_class: int = 5
    lr: float = 1e-3
    proxy_lr_mult: float = 100.0
    weight_decay: float = 1e-4
    epochs: int = 10
    warmup_epochs: int = 0
    freeze_bn: bool = False
    lr_step: int = 4
    lr_gamma: float = 0.5
    grad_clip: float = 10.0
    seed: int = 0
    deterministic: bool = True  # deterministic kernels: a resumed run matches an uninterrupted one
    device: str = "auto"
    workers: int = 0
    max_steps_per_epoch: Optional[int] = None  # tiny smoke runs
    eval_every: int = 1
    recall_ks: tuple = (1, 2, 4, 8)
    eval_batch_size: int = 256
    metric_examples: int = 10_000  # alignment / uniformity on at most this many test embeddings
    reservoir_size: int = 2000
    reservoir_per_step: int = 16
    positivity_batches: int = 2
    positivity_pairs: int = 1000
    progress: bool = True
    stop_after_epoch: Optional[int] = None  # stop as if interrupted (resume tests, time-sliced jobs)


def init_distributed(device: str = "auto") -> bool:
    """Join the torchrun job this process was started in (RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
    come from the environment): nccl on CUDA, gloo on the CPU. False, doing nothing, for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # the other ranks wait in a collective while rank 0 alone evaluates: allow it more than the default
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    return True


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _logger(out: Path, rank: int = 0) -> logging.Logger:
    log = logging.getLogger("metrix_kernels.train")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if rank != 0:  # one log, rank 0's
        return log
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(out / LOG_NAME), logging.StreamHandler()):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


@contextmanager
def deterministic_kernels(enabled: bool = True):
    """torch's deterministic algorithms while inside (CPU scatter-adds, the backward of indexing,
    otherwise vary in the last bits between runs), without the NaN fill of every new tensor that
    comes with them: that fill only makes reads of uninitialized memory visible, and costs about a
    millisecond of a digits step (the [M, C] buffers of feature mixup). Restores the settings after."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def train_step(model, criterion, optimizer, x, y, mixup, generator, grad_clip) -> tuple[float, torch.Tensor]:
    """Forward, Metrix loss (clean + w * mixed), backward, clipped update; the loss and the embeddings."""
    embeddings, features = model(x, with_features=True)
    # the mixed forward goes through the bare module: DistributedDataParallel's forward is for the clean batch
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    extra = {}
    if mixup == "feature":
        # the bare linear layer: the loss normalizes the mixed embeddings itself (cosine), so the
        # head's normalization would run twice over the M mixed rows
        extra = {"features": features, "head": inner.embed}
    elif mixup == "input":
        extra = {"inputs": x, "model": inner}
    loss = criterion(embeddings, y, generator=generator, **extra)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if criterion.process_group is not None:
        # every rank computed the same proxy gradient; averaging keeps the replicas bit-identical
        # where kernels are not deterministic (DDP does the same for the model)
        world = dist.get_world_size()
        for p in criterion.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.item(), embeddings.detach()


class Trainer:
    """resume: continue the run in config.out, with its saved settings (a field named in ``given``, the
    settings a user set explicitly, must agree with them). overwrite: start again where config.out holds
    a run, which is otherwise refused."""

    def __init__(self, config: Config, resume: bool = False, overwrite: bool = False, given: Iterable[str] = ()):
        self.rank, self.world_size = _world()
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        if not resume and self.rank == 0 and self.checkpoint_path.exists():
            if not overwrite:
                raise FileExistsError(f"{self.out} holds a run already ({self.checkpoint_path.name}): --resume "
                                      "continues it, --overwrite starts it again, --out names another folder")
            for name in (self.checkpoint_path.name, LOG_NAME, *report.OUTPUTS):
                (self.out / name).unlink(missing_ok=True)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        checkpoint = None
        if resume:
            checkpoint = self._read_checkpoint()
            saved = dict(checkpoint["config"])
            saved["recall_ks"] = tuple(saved["recall_ks"])
            changed = [f"{name} {getattr(config, name)!r} (the run's: {saved[name]!r})" for name in sorted(given)
                       if name in saved and getattr(config, name) != saved[name]]
            if changed:
                raise ValueError(f"--resume continues {self.out} with its own settings; these differ: "
                                 + ", ".join(changed) + " (start a new run with another --out for them)")
            saved.update({k: getattr(config, k) for k in RUNTIME_FIELDS})
            config = Config(**saved)
        self.cfg = cfg = config
        self.log = _logger(self.out, self.rank)
        self.progress = cfg.progress and self.rank == 0
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: torch sees no GPU here (use --device cpu or auto)")
        if self.world_size > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # init_distributed set LOCAL_RANK's

        self.splits = data.load(cfg.dataset, cfg.data_root)
        images = self.splits.images
        train_tf = None if images is not None else data.image_transforms(cfg.image_size, train=True)
        eval_tf = None if images is not None else data.image_transforms(cfg.image_size, train=False)
        self.train_set = data.SplitDataset(self.splits.train, train_tf, images)
        self.train_eval_set = data.SplitDataset(self.splits.train, eval_tf, images)
        self.test_set = data.SplitDataset(self.splits.test, eval_tf, images)
        self.gallery_set = data.SplitDataset(self.splits.gallery, eval_tf, images) if self.splits.gallery else None

        self.model = build_model(cfg.backbone, cfg.embedding_size, cfg.pretrained, cfg.freeze_bn).to(self.device)
        proxies = loss_row(cfg.loss).uses_proxies
        self.criterion = MetrixLoss(
            cfg.loss, mixup=cfg.mixup, pairs=cfg.pairs, mix_alpha=cfg.mix_alpha, weight=cfg.weight,
            num_classes=self.splits.train.num_classes if proxies else None,
            embedding_size=cfg.embedding_size if proxies else None,
            backend=cfg.backend, label_mode=cfg.label_mode, hard_negatives=cfg.hard_negatives,
            mix_hardest=cfg.mix_hardest,
            process_group="world" if self.world_size > 1 else None, **cfg.loss_params,
        ).to(self.device)
        groups = [{"params": list(self.model.parameters())}]
        if proxies:
            groups.append({"params": list(self.criterion.parameters()), "lr": cfg.lr * cfg.proxy_lr_mult})
        self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)  # the recipe: Adam, L2 1e-4
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_gamma)
        self.sampler = self._sampler(cfg.seed)
        if self.world_size > 1:
            self.sampler.shard(self.rank, self.world_size)
        self.loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=cfg.workers)
        self.mix_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.reservoir = MixedReservoir(cfg.reservoir_size, cfg.reservoir_per_step, cfg.seed + 2)
        self.history: list[dict] = []
        self.untrained_recall: Optional[dict] = None  # the baseline of the network before any step
        self.epoch = 0
        if checkpoint is not None:
            self._restore(checkpoint)
            self.log.info(f"resumed from {self.checkpoint_path} after epoch {self.epoch}")
        self._ddp, self._ddp_trainable = None, None
        if self.world_size > 1:
            for p in self.criterion.parameters():  # proxies: seeded alike on every rank, but make sure
                dist.broadcast(p.data, src=0)

    def _sampler(self, seed: int):
        cfg, labels = self.cfg, self.splits.train.labels
        if cfg.sampler == "random":
            sampler = RandomBatchSampler(len(labels), cfg.batch_size, seed)
        elif cfg.sampler == "balanced":
            if cfg.batch_size % cfg.samples_per_class or cfg.batch_size // cfg.samples_per_class < 2:
                raise ValueError(f"balanced sampling: batch size {cfg.batch_size} must be a multiple of "
                                 f"{cfg.samples_per_class} samples per class, with at least two classes per batch "
                                 "(a batch of one class has no negatives to mix)")
            sampler = BalancedBatchSampler(labels, cfg.batch_size // cfg.samples_per_class, cfg.samples_per_class, seed)
        else:
            raise ValueError(f"unknown sampler {cfg.sampler!r}; expected 'random' or 'balanced'")
        if cfg.max_steps_per_epoch:
            sampler.num_batches = min(sampler.num_batches, cfg.max_steps_per_epoch)
        return sampler

    # ---- training -----------------------------------------------------------------------------

    def fit(self) -> Optional[dict]:
        """Train to the last epoch and evaluate; None when stopped early by stop_after_epoch, and on
        ranks other than 0."""
        with deterministic_kernels(self.cfg.deterministic):
            results = self._fit()
            if self.world_size > 1:
                dist.barrier()  # the job ends when rank 0 has written the results
            return results if self.rank == 0 else None

    def _fit(self) -> Optional[dict]:
        cfg = self.cfg
        processes = f" x {self.world_size} processes" if self.world_size > 1 else ""
        self.log.info(f"{cfg.dataset} / {cfg.loss} / {cfg.method} (mixup={cfg.mixup}) on {self.device}{processes}: "
                      f"{len(self.splits.train)} train, {len(self.splits.test)} test examples, out={self.out}")
        if self.rank == 0 and self.epoch == 0 and self.untrained_recall is None:
            rng = torch.get_rng_state()  # the evaluation's loader draws a seed: training draws as without it
            self.untrained_recall = self.evaluate_recall()
            torch.set_rng_state(rng)
            self.log.info(f"before training: R@1 {self.untrained_recall['1']:.2f}")
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            self.model.freeze_backbone(epoch < cfg.warmup_epochs)
            self.sampler.set_epoch(epoch)
            entry = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **self._train_epoch(epoch)}
            self.scheduler.step()
            if self.rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                entry["recall"] = self.evaluate_recall()
            self.history.append(entry)
            self.epoch = epoch + 1
            if self.rank == 0:
                self._save()
            recall = f" R@1 {entry['recall']['1']:.2f}" if "recall" in entry else ""
            self.log.info(f"epoch {self.epoch}/{cfg.epochs} loss {entry['loss']:.4f} step {entry['step_ms']:.1f} ms{recall}")
            if cfg.stop_after_epoch and self.epoch >= cfg.stop_after_epoch and self.epoch < cfg.epochs:
                self.log.info(f"stopped after epoch {self.epoch} (--stop-after-epoch); continue with --resume")
                return None
        if self.rank != 0:
            return None
        results = self.results(self.evaluate())
        report.write(results, self.out)
        self.log.info("\n" + report.markdown(results))
        self.log.info(f"wrote {self.out / 'results.json'}, results.md, *.png, train.log")
        return results

    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        losses, times = [], []
        batches = _progress(self.loader, self.progress, desc=f"epoch {epoch + 1}/{self.cfg.epochs}")
        for x, y, index in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            start = time.perf_counter()
            loss, embeddings, mix_state = self.step(x, y)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(loss)
            if self.cfg.mixup is not None:
                self._record(mix_state, embeddings, y, index)
            if self.progress:
                batches.set_postfix(loss=f"{loss:.4f}")
        return {"loss": float(np.mean(losses)), "step_ms": 1000.0 * float(np.median(times))}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimization step; returns the loss, the embeddings and the mix generator's prior state."""
        mix_state = self.mix_generator.get_state()
        loss, embeddings = train_step(self._training_model(), self.criterion, self.optimizer, x, y, self.cfg.mixup,
                                      self.mix_generator, self.cfg.grad_clip)
        return loss, embeddings, mix_state

    def _training_model(self) -> torch.nn.Module:
        """The model, under DistributedDataParallel when distributed. DDP reduces the parameters that
        required grad when it was built, so it is built again when warm-up freezes or thaws the backbone."""
        if self.world_size == 1:
            return self.model
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable != self._ddp_trainable:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp, self._ddp_trainable = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids), trainable
        return self._ddp

    def _record(self, mix_state: torch.Tensor, embeddings: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        """Replay the loss's draw (same generator state) to learn which pairs it mixed, with which lam.

        Distributed: the loss mixed pairs of the global batch with rank 0's draw, so rank 0 replays
        its own generator on the gathered batch and alone keeps the reservoir."""
        if self.world_size > 1:
            group = dist.group.WORLD
            embeddings, y, index = (gather(t, group) for t in (embeddings, y, index.to(y.device)))
            index = index.cpu()
            if self.rank != 0:
                return
        replay = torch.Generator()
        replay.set_state(mix_state)
        c = self.criterion
        plan = plan_mixing(embeddings, y, c.mixup, c.pairs, c.lam, c.mix_alpha, c.label_mode, c.hard_negatives, replay,
                           mix_hardest=c.mix_hardest)
        self.reservoir.add(index[plan.i.cpu()], index[plan.j.cpu()], plan.lam)

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.cfg.eval_batch_size, num_workers=self.cfg.workers)
        out, labels = [], []
        for x, y, _ in loader:
            out.append(self.model(x.to(self.device)).float())
            labels.append(y)
        return torch.cat(out), torch.cat(labels).to(self.device)

    def evaluate_recall(self) -> dict:
        test, test_labels = self.embed(self.test_set)
        gallery = self.embed(self.gallery_set) if self.gallery_set is not None else (None, None)
        recall = metrics.recall_at_k(test, test_labels, self.cfg.recall_ks, *gallery)
        return {str(k): v for k, v in recall.items()}

    @torch.no_grad()
    def embed_mixed(self) -> Optional[torch.Tensor]:
        """The final model's embeddings of the mixed examples kept in the reservoir."""
        if len(self.reservoir) == 0:
            return None
        self.model.eval()
        out = []
        r = self.reservoir
        for start in range(0, len(r), self.cfg.eval_batch_size):
            rows = slice(start, start + self.cfg.eval_batch_size)
            xi = self._stack(r.i[rows])
            xj = self._stack(r.j[rows])
            lam = r.lam[rows].to(self.device)
            out.append(self._mix(xi, xj, lam))
        return torch.cat(out)

    def _stack(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.train_eval_set[k][0] for k in indices.tolist()]).to(self.device)

    def _mix(self, xi: torch.Tensor, xj: torch.Tensor, lam: torch.Tensor, how: Optional[str] = None) -> torch.Tensor:
        """Embeddings of lam * x_i + (1 - lam) * x_j mixed at the level ``how`` (default: the run's mixup)."""
        how = how or self.cfg.mixup
        shape = (-1,) + (1,) * (xi.ndim - 1)
        if how == "input":
            return self.model(lam.view(shape) * xi + (1 - lam.view(shape)) * xj)
        if how == "feature":
            fi, fj = self.model.features(xi), self.model.features(xj)
            return self.model.head(pool(lam.view(-1, 1, 1, 1) * fi + (1 - lam.view(-1, 1, 1, 1)) * fj))
        return F.normalize(lam[:, None] * self.model(xi) + (1 - lam[:, None]) * self.model(xj), dim=1)

    def evaluate(self) -> dict:
        cfg = self.cfg
        test, test_labels = self.embed(self.test_set)
        gallery = self.embed(self.gallery_set) if self.gallery_set is not None else (None, None)
        train, _ = self.embed(self.train_eval_set)
        recall = metrics.recall_at_k(test, test_labels, cfg.recall_ks, *gallery)
        pick = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.metric_examples]
        mixed = self.embed_mixed()
        return {
            "recall": {str(k): v for k, v in recall.items()},
            "alignment": metrics.alignment(test[pick.to(test.device)], test_labels[pick.to(test.device)]),
            "uniformity": metrics.uniformity(test[pick.to(test.device)]),
            "utilization": metrics.utilization(test, train),
            "utilization_mixed": None if mixed is None else metrics.utilization(test, torch.cat([train, mixed])),
            "mixed_recorded": len(self.reservoir),
            "positivity": self.positivity_curve(),
        }

    @torch.no_grad()
    def positivity_curve(self, lams=np.linspace(0.05, 0.95, 10)) -> list[dict]:
        """Figure 2: positivity of pos-neg mixed embeddings vs lam, over a few training batches.

        Mixed at the run's level for feature / embedding mixup, at the feature level otherwise
        (input mixup's all-pairs forward passes would be too costly for a diagnostic).
        """
        cfg = self.cfg
        self.model.eval()
        how = cfg.mixup if cfg.mixup in ("feature", "embedding") else "feature"
        sampler = self._sampler(cfg.seed + 3)
        generator = torch.Generator().manual_seed(cfg.seed + 4)
        totals = {float(lam): [0, 0.0, 0.0] for lam in lams}
        proxies = None if self.criterion.proxies is None else self.criterion.proxies.detach().float()
        for batch in sampler.batches()[: cfg.positivity_batches]:
            x = torch.stack([self.train_eval_set[k][0] for k in batch]).to(self.device)
            y = torch.tensor([self.splits.train.labels[k] for k in batch], device=self.device)
            features = self.model.features(x)
            embeddings = self.model.head(pool(features))
            i, j = batch_pairs(y, "pos-neg")
            keep = torch.randperm(i.numel(), generator=generator)[: cfg.positivity_pairs].to(i.device)
            i, j = i[keep], j[keep]
            for lam in totals:
                w = torch.full((i.numel(),), lam, device=self.device)
                if how == "feature":
                    mixed = self.model.head(pool(w.view(-1, 1, 1, 1) * features[i] + (1 - w.view(-1, 1, 1, 1)) * features[j]))
                else:
                    mixed = F.normalize(lam * embeddings[i] + (1 - lam) * embeddings[j], dim=1)
                with torch.enable_grad():
                    p = metrics.positivity(cfg.loss, embeddings, y, mixed, y[i], y[j], lam, proxies, **self.criterion.loss_params)
                t = totals[lam]
                t[0] += p["pairs"]
                t[1] += p["empirical"] * p["pairs"] if p["pairs"] else 0.0
                t[2] += p["cdf"] * p["pairs"] if p["pairs"] else 0.0
        return [{"lam": lam, "pairs": n, "empirical": e / n if n else None, "cdf": c / n if n else None, "mixing": how}
                for lam, (n, e, c) in totals.items()]

    def results(self, final: dict) -> dict:
        steps = [h["step_ms"] for h in self.history[1:]] or [h["step_ms"] for h in self.history]
        return {
            "config": asdict(self.cfg),
            "method": self.cfg.method,
            "device": str(self.device),
            "world_size": self.world_size,
            "torch": torch.__version__,
            "history": self.history,
            "untrained_recall": self.untrained_recall,
            "step_ms": float(np.median(steps)),
            "final": final,
        }

    # ---- checkpoints --------------------------------------------------------------------------

    def _read_checkpoint(self) -> dict:
        """Rank 0 reads the checkpoint and sends it to the other ranks, which may run on machines without
        the file."""
        checkpoint = None
        if self.rank == 0 and self.checkpoint_path.is_file():
            checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if self.world_size > 1:
            box = [checkpoint]
            dist.broadcast_object_list(box, src=0)
            checkpoint = box[0]
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}")
        return checkpoint

    def _save(self) -> None:
        state = {
            "config": asdict(self.cfg),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "untrained_recall": self.untrained_recall,
            "reservoir": self.reservoir.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "mix": self.mix_generator.get_state(),
            },
        }
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)  # atomic: a crash leaves the previous checkpoint intact

    def _restore(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.model.load_state_dict(state["model"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = state["history"]
        self.untrained_recall = state.get("untrained_recall")  # absent from checkpoints of earlier versions
        self.reservoir.load_state_dict(state["reservoir"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.mix_generator.set_state(rng["mix"])
