"""metrix-train: the command line of the trainer.

Settings resolve in this order, later winning: Config defaults, the dataset recipe, the loss
recipe, the method preset (baseline, metrix, Table 3's comparison methods), explicit flags.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch.distributed as dist

from ..family import FAMILY
from ..pairs import DEFAULT_PAIRS, LABEL_MODES, PAIR_SETS
from .allocator import keep_freed_memory
from .data import DATASETS
from .loop import Config, Trainer, init_distributed
from .model import BACKBONES
from .presets import COMPARISON_METHODS, DATASET_RECIPES, LOSS_RECIPES, METRIX


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metrix-train",
        description="Train a deep metric learning model with Metrix (mixup for metric learning). "
        "With no arguments: scikit-learn's digits, classes 0-4 train, 5-9 test, Metrix/feature "
        "with multi-similarity, a few minutes on a CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--dataset", default="digits", choices=DATASETS)
    add("--data-root", help="dataset folder (or its parent) in the standard layout")
    add("--out", help="output folder (default runs/<dataset>-<loss>-<method>-s<seed>)")
    add("--loss", default="multi_similarity", choices=sorted(FAMILY))
    add("--loss-param", action="append", default=[], metavar="NAME=VALUE", help="loss hyperparameter, repeatable")
    add("--method", default="metrix", choices=sorted(COMPARISON_METHODS), help="baseline, Metrix or a Table 3 method")
    add("--mixup", choices=["none", "input", "feature", "embedding"], help="mixup level (metrix default: feature)")
    add("--pairs", choices=[DEFAULT_PAIRS, *PAIR_SETS])
    add("--label-mode", choices=LABEL_MODES)
    add("--weight", type=float, help="mixup strength w of eq. 10")
    add("--mix-alpha", type=float, help="lam ~ Beta(mix_alpha, mix_alpha)")
    add("--hard-negatives", type=int, help="input mixup: hardest negatives per anchor")
    add("--backend", default="auto", help="loss backend of metrix_loss: auto, reference, cpu, triton, cuda")
    add("--backbone", choices=BACKBONES)
    add("--pretrained", help="'imagenet' (torchvision's cache, no download), a .pth path, or 'none'")
    add("--embedding-size", type=int)
    add("--image-size", type=int)
    add("--batch-size", type=int, help="global batch, split over the processes under torchrun")
    add("--sampler", choices=["random", "balanced"])
    add("--samples-per-class", type=int, help="balanced sampling")
    add("--lr", type=float)
    add("--proxy-lr-mult", type=float)
    add("--weight-decay", type=float)
    add("--epochs", type=int)
    add("--warmup-epochs", type=int, help="epochs with the backbone frozen")
    add("--freeze-bn", action=argparse.BooleanOptionalAction, default=None)
    add("--lr-step", type=int, help="StepLR period in epochs")
    add("--lr-gamma", type=float)
    add("--grad-clip", type=float)
    add("--seed", type=int, default=0)
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=True,
        help="deterministic kernels (needed for --resume to match an uninterrupted run)")
    add("--workers", type=int, default=0, help="data loading processes")
    add("--max-steps-per-epoch", type=int, help="cap steps per epoch (smoke tests)")
    add("--eval-every", type=int, help="Recall@K every N epochs")
    add("--reservoir-size", type=int, help="mixed examples kept for utilization")
    add("--positivity-batches", type=int)
    add("--no-progress", action="store_true", help="no progress bars")
    add("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    add("--stop-after-epoch", type=int, help="stop after this epoch as if interrupted")
    add("--show-config", action="store_true", help="print the resolved settings and exit")
    return p


def _loss_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            params[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SystemExit(f"metrix-train: --loss-param expects NAME=NUMBER, got {item!r}")
    return params


def resolve(args: argparse.Namespace) -> Config:
    settings = {"dataset": args.dataset, "data_root": args.data_root, "loss": args.loss, "method": args.method}
    settings.update(DATASET_RECIPES[args.dataset])
    settings["loss_params"] = {**LOSS_RECIPES.get(args.loss, {}), **_loss_params(args.loss_param)}
    settings.update(METRIX)
    settings["mixup"] = "feature"
    settings.update(COMPARISON_METHODS[args.method])
    flags = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    settings.update(flags)
    if args.mixup is not None:
        settings["mixup"] = None if args.mixup == "none" else args.mixup
    if settings["mixup"] is None:
        settings["method"] = "baseline"
    elif args.method == "metrix":
        settings["method"] = f"metrix/{settings['mixup']}"
    settings["progress"] = not args.no_progress
    settings.setdefault("out", None)
    if not settings["out"]:
        settings["out"] = f"runs/{args.dataset}-{args.loss}-{settings['method'].replace('/', '-')}-s{args.seed}"
    settings["recall_ks"] = tuple(settings["recall_ks"])
    return Config(**settings)


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    config = resolve(args)
    if args.show_config:
        from dataclasses import asdict

        print(json.dumps(asdict(config), indent=2))
        return 0
    keep_freed_memory()
    distributed = init_distributed(config.device)  # under torchrun: one process per device
    try:
        results = Trainer(config, resume=args.resume).fit()
        if distributed:
            # every rank done before any tears down: gloo aborts a rank whose peer closed the connection
            # under it ("terminate called without an active exception")
            dist.barrier()
    except FileNotFoundError as error:
        print(f"metrix-train: {error}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.destroy_process_group()
    if results is not None:
        recall = "  ".join(f"R@{k} {v:.2f}" for k, v in results["final"]["recall"].items())
        cfg = results["config"]  # the checkpoint's settings when resumed
        print(f"{cfg['dataset']} {cfg['loss']} {results['method']}: {recall}")
    return 0
