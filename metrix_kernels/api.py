"""metrix_loss and MetrixLoss: validate once, pick the backend, return clean + w * mixed (eq. 10)."""
from __future__ import annotations

import importlib
import math
import numbers
import warnings
from typing import Callable, Optional

import torch

from . import distributed, ops, reference
from .family import is_real, resolve
from .pairs import (
    DEFAULT_PAIRS,
    MixPlan,
    check_label_mode,
    check_pair_set,
    choose_pair_set,
    hard_negative_plan,
    sample_lam,
)

MIXUPS = (None, "embedding", "feature", "input")
BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")
FUSED_BACKENDS = ("triton", "cpu", "cuda")  # modules of metrix_kernels.backends (their contract)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` imports and, if it says so through ``available(device)``, runs here."""
    return _backend_runs(name, device.type)


def _backend_runs(name: str, device_type: str) -> bool:
    try:
        module = importlib.import_module(f"metrix_kernels.backends.{name}")
    except Exception:  # a missing package or an unbuilt extension: the backend is just absent
        return False
    check = getattr(module, "available", None)
    return bool(check(torch.device(device_type))) if callable(check) else True


# torch.compiler.assume_constant_result's marker, set directly: compiled code then takes the answer
# instead of breaking its graph at the import, and importing the library does not import
# torch._dynamo (1.4 s, and it fixes Triton's TRITON_INTERPRET setting early).
_backend_runs._dynamo_marked_constant = True


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that computes the loss for tensors on ``device``: "reference" or a fused one.

    "auto": triton for CUDA tensors when triton imports, else the cpu backend when it reports itself
    available, else the reference.
    """
    _check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and _fused_available("triton", device):
            return "triton"
        return "cpu" if _fused_available("cpu", device) else "reference"
    if backend != "reference" and not _fused_available(backend, device):
        usable = ["auto", "reference"] + [name for name in FUSED_BACKENDS if _fused_available(name, device)]
        raise ValueError(f"backend {backend!r} is not available for {device} tensors; available: {usable}")
    return backend


def _check_tensor(name: str, x, ndim: int, shape_hint: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_hint}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_hint}, got {tuple(x.shape)}")


def _check_like(name: str, x: torch.Tensor, embeddings: torch.Tensor, dtype: bool = True) -> None:
    if x.device != embeddings.device:
        raise ValueError(f"{name} is on {x.device} but embeddings are on {embeddings.device}; expected the same device")
    if dtype and x.dtype != embeddings.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but embeddings have {embeddings.dtype}; expected the same dtype")


def validate(embeddings, labels, row, proxies, mixup, features, head, inputs, model) -> None:
    """Raise a clear ValueError / TypeError for anything metrix_loss cannot take."""
    _check_tensor("embeddings", embeddings, 2, "[B, d]")
    if embeddings.dtype not in _FLOATS:
        raise TypeError(f"embeddings must be floating point ({', '.join(map(str, _FLOATS))}), got {embeddings.dtype}")
    b, d = embeddings.shape
    if b < 1 or d < 1:
        raise ValueError(f"embeddings must have at least one example and one dimension, got {tuple(embeddings.shape)}")
    _check_tensor("labels", labels, 1, f"[B] = [{b}]")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if labels.shape[0] != b:
        raise ValueError(f"labels must have one entry per embedding: expected [{b}], got {tuple(labels.shape)}")
    _check_like("labels", labels, embeddings, dtype=False)
    if row.uses_proxies:
        if proxies is None:
            raise ValueError(f"loss {row.name!r} needs proxies: pass proxies=[num_classes, {d}] or use MetrixLoss")
        _check_tensor("proxies", proxies, 2, f"[num_classes, {d}]")
        if proxies.shape[1] != d:
            raise ValueError(f"proxies must have shape [num_classes, {d}], got {tuple(proxies.shape)}")
        _check_like("proxies", proxies, embeddings)
        minimum = 2 if row.candidates == "proxies" else 1
        if proxies.shape[0] < minimum:
            raise ValueError(f"loss {row.name!r} needs at least {minimum} proxies, got {proxies.shape[0]}")
        # one host sync (compiled code leaves it out rather than break its graph here)
        if labels.numel() and not torch.compiler.is_compiling():
            low, high = torch.aminmax(labels)
            low, high = torch.stack((low, high)).tolist()
            if low < 0 or high >= proxies.shape[0]:
                raise ValueError(
                    f"labels must lie in [0, {proxies.shape[0]}) to index the proxies, got values in [{low}, {high}]"
                )
    elif proxies is not None:
        raise ValueError(f"loss {row.name!r} takes no proxies")
    if mixup not in MIXUPS:
        raise ValueError(f"unknown mixup {mixup!r}; expected one of {list(MIXUPS)}")
    if mixup == "feature":
        _check_tensor("features", features, 4, f"[B, C, H, W] with B = {b}")
        if features.shape[0] != b:
            raise ValueError(f"features must have one map per embedding: expected B = {b}, got {tuple(features.shape)}")
        _check_like("features", features, embeddings, dtype=False)
        if not callable(head):
            raise TypeError("mixup='feature' needs head: a callable from pooled features [M, C] to embeddings [M, d]")
    if mixup == "input":
        if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1 or inputs.shape[0] != b:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"mixup='input' needs inputs: a tensor [B = {b}, ...], got {got}")
        if not callable(model):
            raise TypeError("mixup='input' needs model: a callable from inputs [M, ...] to embeddings [M, d]")
        if not inputs.dtype.is_floating_point:
            raise TypeError(f"mixup='input' interpolates inputs: they must be floating point, got {inputs.dtype}")


def _check_options(lam, mix_alpha, weight, hard_negatives, mix_hardest) -> None:
    if lam is not None and not (is_real(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be None (drawn from Beta(mix_alpha, mix_alpha)) or a number in [0, 1], got {lam!r}")
    if not (is_real(mix_alpha) and mix_alpha > 0 and math.isfinite(mix_alpha)):
        raise ValueError(f"mix_alpha must be a finite number > 0, got {mix_alpha!r}")
    if not (is_real(weight) and weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if not (is_real(hard_negatives) and isinstance(hard_negatives, numbers.Integral) and hard_negatives >= 1):
        raise ValueError(f"hard_negatives must be an int >= 1, got {hard_negatives!r}")
    if not isinstance(mix_hardest, bool):
        raise ValueError(f"mix_hardest must be True or False, got {mix_hardest!r}")


def plan_mixing(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    mixup: str,
    pairs: str,
    lam: Optional[float],
    mix_alpha: float,
    label_mode: str,
    hard_negatives: int,
    generator: Optional[torch.Generator],
    group=None,
    mix_hardest: bool = False,
) -> MixPlan:
    """Draw the pair set and lam of this call (rank 0's under a process group) and list the pairs to mix:
    each anchor's hard_negatives hardest negatives for input mixup (and for the others with
    mix_hardest), else every pair of the set."""
    pair_set = choose_pair_set(pairs, generator)
    lam = float(lam) if lam is not None else sample_lam(mix_alpha, generator)
    if group is not None:
        pair_set, lam = distributed.agree(pair_set, lam, group, embeddings.device)
    if mixup == "input" or mix_hardest:
        return hard_negative_plan(embeddings, labels, pair_set, lam, label_mode, int(hard_negatives))
    return MixPlan(None, None, lam, pair_set, label_mode, labels=labels)


def metrix_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "multi_similarity",
    mixup: Optional[str] = "embedding",
    pairs: str = DEFAULT_PAIRS,
    lam: Optional[float] = None,
    mix_alpha: float = 2.0,
    weight: float = 0.4,
    proxies: Optional[torch.Tensor] = None,
    backend: str = "auto",
    generator: Optional[torch.Generator] = None,
    features: Optional[torch.Tensor] = None,
    head: Optional[Callable] = None,
    inputs: Optional[torch.Tensor] = None,
    model: Optional[Callable] = None,
    label_mode: str = "interpolate",
    hard_negatives: int = 3,
    mix_hardest: bool = False,
    process_group=None,
    **loss_params,
) -> torch.Tensor:
    """The Metrix error function E = clean loss + weight * mixed loss (paper eq. 10).

    embeddings [B, d] (any scale: similarities are cosine), labels [B] integer classes.
    loss: a row of ``metrix_kernels.family.FAMILY``; its hyperparameters go in ``loss_params``
    (pytorch-metric-learning's names and defaults where PML has the loss).
    mixup: None (clean loss only), "embedding", "feature" (also features [B, C, H, W] and head:
    pooled [M, C] -> [M, d]) or "input" (also inputs [B, ...] and model: inputs -> embeddings).
    pairs: "pos-neg", "anc-neg", "pos-pos", "neg-neg" or "pos-neg/anc-neg" (one drawn per call).
    lam: fixed interpolation factor, or None to draw lam ~ Beta(mix_alpha, mix_alpha) per call.
    label_mode: "interpolate" (Metrix), "negative" (MoCHi-style) or "dominant" (no interpolation).
    hard_negatives: input mixup's negatives per anchor, its hardest (most similar) ones; mix_hardest:
    embedding and feature mixup also mix those only (MoCHi's selection), not every pair of the set.
    proxies: [num_classes, d] for proxy losses.
    process_group: None, "world" or a torch.distributed ProcessGroup: the loss of the batch gathered
    from all its ranks, identical on every rank (a collective; see ``metrix_kernels.distributed``).
    """
    row, terms, _ = resolve(loss, loss_params)
    validate(embeddings, labels, row, proxies, mixup, features, head, inputs, model)
    check_pair_set(pairs)
    check_label_mode(label_mode)
    _check_options(lam, mix_alpha, weight, hard_negatives, mix_hardest)
    weight = float(weight)
    backend = _resolve_backend(backend, embeddings.device)
    impl, on = (reference, {}) if backend == "reference" else (ops, {"backend": backend})
    group = distributed.resolve_group(process_group)
    if group is not None:
        embeddings, labels, features, head, inputs, model = distributed.gather_batch(
            group, mixup, embeddings, labels, features, head, inputs, model
        )

    if mixup is not None and loss == "nca":
        warnings.warn("NCA's mixed term has no gradient: an anchor's mixed candidates all carry one soft label, "
                      "and NCA's ratio of labelled to total mass is then a constant (README, Losses)", stacklevel=2)
    if mixup is None:
        loss = impl.clean_loss(row, terms, embeddings, labels, proxies, **on)
    else:
        plan = plan_mixing(embeddings, labels, mixup, pairs, lam, mix_alpha, label_mode, hard_negatives, generator,
                           group, mix_hardest)
        loss = impl.error_function(row, terms, embeddings, labels, proxies, plan, mixup, features, head, inputs, model,
                                   weight, **on)
    return _nan_unless_finite(loss, embeddings, proxies)


def _nan_unless_finite(loss: torch.Tensor, *tensors) -> torch.Tensor:
    """loss, or NaN when an input holds a NaN or an infinity, as PML gives: the kernels' running maxima
    and the hinges pass over NaN similarities, and a diverged run must not log a finite loss. loss plus
    zero times a float32 sum of the inputs: two small ops for one input, no host sync."""
    total = None
    for t in tensors:
        if t is not None:
            part = t.detach().sum(dtype=torch.float32)
            total = part if total is None else total + part
    return torch.add(loss, total, alpha=0).to(loss.dtype)  # 0 * inf and 0 * NaN are NaN


class MetrixLoss(torch.nn.Module):
    """metrix_loss as a module. Proxy losses own their proxies (num_classes x embedding_size).

    Proxies are initialized like PML's and the Proxy Anchor paper's (Kaiming normal, fan_out);
    give them a larger learning rate (the recipe uses 100x). process_group: see metrix_loss.
    """

    def __init__(
        self,
        loss: str = "multi_similarity",
        mixup: Optional[str] = "embedding",
        pairs: str = DEFAULT_PAIRS,
        lam: Optional[float] = None,
        mix_alpha: float = 2.0,
        weight: float = 0.4,
        num_classes: Optional[int] = None,
        embedding_size: Optional[int] = None,
        backend: str = "auto",
        label_mode: str = "interpolate",
        hard_negatives: int = 3,
        mix_hardest: bool = False,
        process_group=None,
        **loss_params,
    ):
        super().__init__()
        row, _, self.loss_params = resolve(loss, loss_params)
        if mixup not in MIXUPS:
            raise ValueError(f"unknown mixup {mixup!r}; expected one of {list(MIXUPS)}")
        check_pair_set(pairs)
        check_label_mode(label_mode)
        _check_options(lam, mix_alpha, weight, hard_negatives, mix_hardest)
        _check_backend(backend)  # availability depends on the tensors' device: checked per call
        distributed.check_group(process_group)
        self.process_group = process_group
        self.loss, self.mixup, self.pairs, self.lam = loss, mixup, pairs, lam
        self.mix_alpha, self.weight, self.backend = mix_alpha, weight, backend
        self.label_mode, self.hard_negatives, self.mix_hardest = label_mode, hard_negatives, mix_hardest
        if row.uses_proxies:
            for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"loss {loss!r} owns proxies: {name} must be a positive int, got {value!r}")
            self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
            torch.nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        else:
            self.register_parameter("proxies", None)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        features: Optional[torch.Tensor] = None,
        head: Optional[Callable] = None,
        inputs: Optional[torch.Tensor] = None,
        model: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        proxies = None if self.proxies is None else self.proxies.to(embeddings.dtype)
        return metrix_loss(
            embeddings, labels, loss=self.loss, mixup=self.mixup, pairs=self.pairs, lam=self.lam,
            mix_alpha=self.mix_alpha, weight=self.weight, proxies=proxies, backend=self.backend,
            generator=generator, features=features, head=head, inputs=inputs, model=model,
            label_mode=self.label_mode, hard_negatives=self.hard_negatives, mix_hardest=self.mix_hardest,
            process_group=self.process_group,
            **self.loss_params,
        )

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, mixup={self.mixup!r}, pairs={self.pairs!r}, weight={self.weight}"
