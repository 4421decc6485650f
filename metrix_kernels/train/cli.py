"""metrix-train: the command line of the trainer.

Settings resolve in this order, later winning: Config defaults, the dataset recipe, the loss
recipe, the method preset (baseline, metrix, Table 3's comparison methods), explicit flags.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

import torch.distributed as dist

from ..family import FAMILY
from ..pairs import DEFAULT_PAIRS, LABEL_MODES, PAIR_SETS
from .allocator import keep_freed_memory
from .data import DATASETS
from .loop import RUNTIME_FIELDS, Config, Trainer, init_distributed
from .model import BACKBONES
from .presets import COMPARISON_METHODS, DATASET_RECIPES, LOSS_RECIPES, METRIX


def _bounded(kind: type, low: float, inclusive: bool):
    """An argparse type: a kind (int or float) above low (or at it, if inclusive), finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        return value

    return parse


POSITIVE_INT, COUNT = _bounded(int, 0, False), _bounded(int, 0, True)
POSITIVE, NON_NEGATIVE = _bounded(float, 0, False), _bounded(float, 0, True)


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
    add("--weight", type=NON_NEGATIVE, help="mixup strength w of eq. 10")
    add("--mix-alpha", type=POSITIVE, help="lam ~ Beta(mix_alpha, mix_alpha)")
    add("--hard-negatives", type=POSITIVE_INT, help="input mixup (and --mix-hardest): hardest negatives per anchor")
    add("--mix-hardest", action=argparse.BooleanOptionalAction, default=None,
        help="embedding / feature mixup over the hardest negatives only (the MoCHi presets)")
    add("--backend", default="auto", help="loss backend of metrix_loss: auto, reference, cpu, triton, cuda")
    add("--backbone", choices=BACKBONES)
    add("--pretrained", help="'imagenet' (torchvision's cache, no download), a .pth path, or 'none'")
    add("--embedding-size", type=POSITIVE_INT)
    add("--image-size", type=POSITIVE_INT, help="image datasets: the side of the crops")
    add("--batch-size", type=POSITIVE_INT, help="global batch, split over the processes under torchrun")
    add("--sampler", choices=["random", "balanced"])
    add("--samples-per-class", type=POSITIVE_INT, help="balanced sampling")
    add("--lr", type=POSITIVE)
    add("--proxy-lr-mult", type=POSITIVE)
    add("--weight-decay", type=NON_NEGATIVE)
    add("--epochs", type=POSITIVE_INT)
    add("--warmup-epochs", type=COUNT, help="epochs with the backbone frozen")
    add("--freeze-bn", action=argparse.BooleanOptionalAction, default=None)
    add("--lr-step", type=POSITIVE_INT, help="StepLR period in epochs")
    add("--lr-gamma", type=POSITIVE)
    add("--grad-clip", type=POSITIVE, help="largest gradient norm")
    add("--seed", type=COUNT, default=0)
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=True,
        help="deterministic kernels (needed for --resume to match an uninterrupted run)")
    add("--workers", type=COUNT, default=0, help="data loading processes")
    add("--max-steps-per-epoch", type=POSITIVE_INT, help="cap steps per epoch (smoke tests)")
    add("--eval-every", type=POSITIVE_INT, help="Recall@K every N epochs")
    add("--reservoir-size", type=POSITIVE_INT, help="mixed examples kept for utilization")
    add("--positivity-batches", type=POSITIVE_INT)
    add("--no-progress", action="store_true", help="no progress bars")
    add("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    add("--overwrite", action="store_true", help="start again in an <out> that holds a run")
    add("--stop-after-epoch", type=POSITIVE_INT, help="stop after this epoch as if interrupted")
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
            raise ValueError(f"--loss-param expects NAME=NUMBER, got {item!r}")
    return params


def _check_method(args: argparse.Namespace) -> None:
    """A flag that changes what a named method is would train another method under its name."""
    if args.method == "metrix":
        return
    preset = COMPARISON_METHODS[args.method]
    for key in ("mixup", "pairs", "label_mode", "mix_hardest"):
        given = getattr(args, key)
        if given is not None and key in preset and (None if given == "none" else given) != preset[key]:
            flag = "--no-mix-hardest" if key == "mix_hardest" else f"--{key.replace('_', '-')} {given}"
            raise ValueError(f"--method {args.method} has {key} {preset[key]}: with {flag} it would be "
                             f"another method under its name; use --method metrix {flag}")


def _check_data(settings: dict, args: argparse.Namespace) -> None:
    """The digits are 8 x 8 grey arrays for the digits backbone; the image datasets are RGB images
    for ResNet-50."""
    if args.dataset == "digits":
        if settings["backbone"] != "digits":
            raise ValueError("the digits are 8 x 8 grey arrays for --backbone digits; ResNet-50 takes "
                             "an image dataset (e.g. --dataset cub200 --data-root D --pretrained none --image-size 32)")
        if args.image_size is not None:
            raise ValueError("--image-size applies to image datasets; the digits are 8 x 8")
    elif settings["backbone"] == "digits":
        raise ValueError(f"--backbone digits takes the 8 x 8 digits; {args.dataset} needs resnet50")


def resolve(args: argparse.Namespace) -> Config:
    _check_method(args)
    settings = {"dataset": args.dataset, "data_root": args.data_root, "loss": args.loss, "method": args.method}
    settings.update(DATASET_RECIPES[args.dataset])
    settings["loss_params"] = {**LOSS_RECIPES.get(args.loss, {}), **_loss_params(args.loss_param)}
    settings.update(METRIX)
    settings["mixup"] = "feature"
    settings.update(COMPARISON_METHODS[args.method])
    flags = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    settings.update(flags)
    _check_data(settings, args)
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


def given_settings(argv: Optional[list[str]]) -> set[str]:
    """The Config fields the command line sets itself (not by a default or a preset), runtime ones
    left out: what a resumed run must agree with."""
    p = parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    names = set(vars(p.parse_args(argv)))
    fields = {name for name in names if name in Config.__dataclass_fields__}
    if "loss_param" in names:
        fields.add("loss_params")
    return fields - set(RUNTIME_FIELDS)


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = resolve(args)
    except ValueError as error:
        print(f"metrix-train: {error}", file=sys.stderr)
        return 2
    if args.show_config:
        from dataclasses import asdict

        print(json.dumps(asdict(config), indent=2))
        return 0
    keep_freed_memory()
    distributed = init_distributed(config.device)  # under torchrun: one process per device
    try:
        try:
            trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, given=given_settings(argv))
        except (ValueError, TypeError) as error:  # settings the data, the model or the loss cannot take
            print(f"metrix-train: {error}", file=sys.stderr)
            return 2
        results = trainer.fit()
        if distributed:
            # every rank done before any tears down: gloo aborts a rank whose peer closed the connection
            # under it ("terminate called without an active exception")
            dist.barrier()
    except (FileNotFoundError, FileExistsError) as error:
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
