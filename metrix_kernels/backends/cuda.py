"""Backend "cuda": the compiled kernels of csrc/cuda (module metrix_kernels._cuda) behind the
kernel contract of ``metrix_kernels.backends``.

The extension is optional. When it is missing, fails to load, or was built against another torch,
``available()`` is False and a warning is logged once; importing this module never fails.
Build it with ``csrc/gpu_build.sh`` (or ``METRIX_FORCE_CUDA=1 python setup.py build_ext --inplace``).

The kernels take float32 / float16 / bfloat16 embeddings and int32 labels; this module converts,
allocates the outputs, and drives embedding mixup chunk by chunk: P = anchors @ emb^T and
G = emb @ emb^T are formed for at most ``CHUNK_ELEMENTS`` entries at a time (cuBLAS), so memory
stays bounded whatever B is, and each chunk comes with the lists of the i each anchor can mix and
of the anchors each i can be mixed for (``_Groups``), so the kernels skip the non-member triples.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import MEMBER_ALL, MEMBER_ALL_BUT_SELF, MEMBER_ANC_NEG, MEMBER_POS_NEG, MEMBER_POS_POS, KernelConfig

log = logging.getLogger(__name__)

FORMS = {"exp": 0, "hinge": 1, "softplus": 2}  # csrc/cuda/pair_math.cuh: Form, Input
INPUTS = {"s": 0, "d": 1, "d2": 2}
MEMBER_MASK = 6
CHUNK_ELEMENTS = 1 << 22  # float32 entries of one P or G chunk (16 MiB)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = {"loaded": False, "ext": None, "reason": None}


def _load():
    if not _state["loaded"]:
        _state["loaded"] = True
        reason = None
        try:
            from .. import _cuda as ext
        except Exception as error:  # ImportError, OSError (undefined symbols of another torch), ...
            ext, reason = None, f"metrix_kernels._cuda could not be loaded ({error})"
        else:
            running = ".".join(torch.__version__.split(".")[:2])
            built = getattr(ext, "TORCH_VERSION", None)
            if built != running:
                ext, reason = None, f"metrix_kernels._cuda was built for torch {built}, this is torch {running}"
        if reason:
            log.warning("CUDA backend unavailable: %s; rebuild with csrc/gpu_build.sh", reason)
        _state["ext"], _state["reason"] = ext, reason
    return _state["ext"]


def available(device: Optional[torch.device] = None) -> bool:
    """True when the extension is built for this torch and runs on ``device`` (any CUDA device if None)."""
    on_cuda = device is None or torch.device(device).type == "cuda"
    return on_cuda and _load() is not None and torch.cuda.is_available()


def unavailable_reason() -> Optional[str]:
    _load()
    if _state["reason"]:
        return _state["reason"]
    return None if torch.cuda.is_available() else "no CUDA device"


def _extension():
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the CUDA backend is unavailable: {_state['reason']}")
    return ext


def supports(cfg: KernelConfig) -> bool:
    """The kernels specialize on one sigma form and input shared by both terms (true of every family row)."""
    p, n = cfg.sigma_pos, cfg.sigma_neg
    return p.form == n.form and p.of == n.of and p.form in FORMS and p.of in INPUTS


def _sigma_args(cfg: KernelConfig) -> tuple:
    if not supports(cfg):
        raise NotImplementedError(
            f"the CUDA kernels need sigma_pos and sigma_neg of one form and input, got {cfg.sigma_pos} and {cfg.sigma_neg}"
        )
    p, n = cfg.sigma_pos, cfg.sigma_neg
    return (FORMS[p.form], INPUTS[p.of], float(p.scale), float(p.shift), float(n.scale), float(n.shift))


def _kernel_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in _KERNEL_DTYPES else torch.float32


def _int32(x: Optional[torch.Tensor], n: int, device, fill: int = -1) -> torch.Tensor:
    if x is None:
        return torch.full((n,), fill, dtype=torch.int32, device=device)
    return x.to(device=device, dtype=torch.int32).reshape(n).contiguous()


def _float32(x: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    if x is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    return x.to(device=device, dtype=torch.float32).reshape(n).contiguous()


def _pairwise_inputs(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam, cfg,
                     member_mask):
    dtype = _kernel_dtype(rows, cols)
    device = rows.device
    r, v = rows.shape[0], cols.shape[0]
    row_lj = row_label_i if row_label_j is None else row_label_j
    col_lj = col_label_i if col_label_j is None else col_label_j
    member = cfg.member
    mask = None
    if member_mask is not None:
        member = MEMBER_MASK
        mask = member_mask.to(device=device, dtype=torch.bool).reshape(r, v).contiguous()
    tensors = (
        rows.to(dtype).contiguous(), cols.to(dtype).contiguous(),
        _int32(row_label_i, r, device), _int32(row_lj, r, device), _int32(row_index, r, device),
        _int32(col_label_i, v, device), _int32(col_lj, v, device), _int32(col_index, v, device), mask,
    )
    form, of, *scales = _sigma_args(cfg)
    scalars = (float(lam), int(member), int(cfg.label_mode), form, of, bool(cfg.mixed_rows), *scales)
    return tensors, scalars


def pairwise_forward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam, cfg,
                     member_mask=None) -> torch.Tensor:
    """stats [6, R] of the contract."""
    ext = _extension()
    tensors, scalars = _pairwise_inputs(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j,
                                        col_index, lam, cfg, member_mask)
    stats = torch.empty(6, rows.shape[0], dtype=torch.float32, device=rows.device)
    ext.pairwise_forward(*tensors, stats, *scalars)
    return stats


def pairwise_backward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam, cfg,
                      stats, grad_pos_sum, grad_neg_sum, member_mask=None):
    """(grad_rows, grad_cols) from the upstream gradients of the pos / neg term statistics."""
    ext = _extension()
    tensors, scalars = _pairwise_inputs(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j,
                                        col_index, lam, cfg, member_mask)
    r, v, d = rows.shape[0], cols.shape[0], rows.shape[1]
    device = rows.device
    grad_rows = torch.zeros(r, d, dtype=torch.float32, device=device)
    grad_cols = torch.zeros(v, d, dtype=torch.float32, device=device)
    ext.pairwise_backward(
        *tensors, stats.to(torch.float32).contiguous(), *scalars,
        _float32(grad_pos_sum, r, device), _float32(grad_neg_sum, r, device), grad_rows, grad_cols,
    )
    return grad_rows.to(rows.dtype), grad_cols.to(cols.dtype)


def _gram_member(cfg: KernelConfig) -> int:
    if cfg.member in (MEMBER_ALL, MEMBER_ALL_BUT_SELF):
        raise ValueError(f"gram_mixed_* needs a mixing-pair rule, got member code {cfg.member}")
    return int(cfg.member)


def _chunk(rows: int, width: int) -> int:
    return max(1, min(rows, CHUNK_ELEMENTS // max(width, 1)))


def _gram_setup(anchors, anchor_label, anchor_index, emb, labels, lam, cfg):
    device = anchors.device
    a, b = anchors.shape[0], emb.shape[0]
    meta = (_int32(anchor_label, a, device), _int32(anchor_index, a, device), _int32(labels, b, device))
    form, of, *scales = _sigma_args(cfg)
    scalars = (float(lam), _gram_member(cfg), int(cfg.label_mode), form, of, *scales)
    return anchors.to(torch.float32).contiguous(), emb.to(torch.float32).contiguous(), meta, scalars


def _group_keys(member: int, anchor_label, anchor_index, labels):
    """(anchor keys, emb keys): triple (a, i, j) can be a member only where key[a] == key[i], since
    pos-neg and pos-pos need label_i == z and anc-neg needs i == a. Neg-neg (label_i != z) is one
    group: most of its triples are members."""
    if member in (MEMBER_POS_NEG, MEMBER_POS_POS):
        return anchor_label, labels
    if member == MEMBER_ANC_NEG:
        return anchor_index, torch.arange(labels.shape[0], dtype=torch.int32, device=labels.device)
    return torch.zeros_like(anchor_label), torch.zeros_like(labels)


class _Groups:
    """The indices of ``keys`` grouped by key, ascending within a group (a stable sort, so the
    kernels' loop order is fixed), on the device and without a host sync."""

    def __init__(self, keys: torch.Tensor):
        self.n = keys.shape[0]
        order = torch.argsort(keys, stable=True)
        self.order = order.to(torch.int32)
        self.sorted = keys.long()[order] * self.n + order  # ascending (key, index), one int64 each

    def ranges(self, query: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """[2, Q] int32: order[k] for k in [r[0, q], r[1, q]) are the indices in [lo, hi) of key query[q]."""
        q = query.long() * self.n
        return torch.stack([torch.searchsorted(self.sorted, q + lo, out_int32=True),
                            torch.searchsorted(self.sorted, q + hi, out_int32=True)])


def gram_mixed_forward(anchors, anchor_label, anchor_index, emb, labels, lam, cfg) -> torch.Tensor:
    """stats [6, A] of the anchors against all mixing pairs (i, j) of emb, through P and G chunks."""
    ext = _extension()
    af, ef, meta, scalars = _gram_setup(anchors, anchor_label, anchor_index, emb, labels, lam, cfg)
    a, b = af.shape[0], ef.shape[0]
    key_a, key_e = _group_keys(scalars[1], *meta)
    by_key = _Groups(key_e)
    stats = torch.zeros(6, a, dtype=torch.float32, device=af.device)
    if scalars[3] == FORMS["exp"]:
        stats[:2] = -float("inf")
    ca, ci = _chunk(a, b), _chunk(b, b)
    for a0 in range(0, a, ca):
        p = af[a0:a0 + ca] @ ef.T
        for i0 in range(0, b, ci):
            g = ef[i0:i0 + ci] @ ef.T
            i_range = by_key.ranges(key_a[a0:a0 + ca], i0, i0 + g.shape[0])
            ext.gram_forward(p, g, a0, i0, *meta, by_key.order, i_range, stats, *scalars)
    return stats


def gram_mixed_backward(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, stats, grad_pos_sum,
                        grad_neg_sum):
    """(grad_anchors, grad_emb). ds/dG treats |e_i| = 1: the radial part differs from the
    materialized mixture's gradient and vanishes through the normalization in front."""
    ext = _extension()
    af, ef, meta, scalars = _gram_setup(anchors, anchor_label, anchor_index, emb, labels, lam, cfg)
    a, b = af.shape[0], ef.shape[0]
    device = af.device
    key_a, key_e = _group_keys(scalars[1], *meta)
    emb_by_key, anchors_by_key = _Groups(key_e), _Groups(key_a)
    stats = stats.to(torch.float32).contiguous()
    gp, gn = _float32(grad_pos_sum, a, device), _float32(grad_neg_sum, a, device)
    grad_a, grad_e = torch.zeros_like(af), torch.zeros_like(ef)
    ca, ci = _chunk(a, b), _chunk(b, b)
    for a0 in range(0, a, ca):
        p = af[a0:a0 + ca] @ ef.T
        dp = torch.zeros_like(p)
        for i0 in range(0, b, ci):
            g = ef[i0:i0 + ci] @ ef.T
            dg = torch.empty_like(g)
            i_range = emb_by_key.ranges(key_a[a0:a0 + ca], i0, i0 + g.shape[0])
            a_range = anchors_by_key.ranges(key_e[i0:i0 + ci], a0, a0 + p.shape[0])
            ext.gram_backward(p, g, a0, i0, *meta, emb_by_key.order, i_range, anchors_by_key.order, a_range, stats,
                              *scalars, gp, gn, dp, dg)
            grad_e[i0:i0 + ci] += dg @ ef  # G[i, j] = <e_i, e_j>
            grad_e += dg.T @ ef[i0:i0 + ci]
        grad_a[a0:a0 + ca] = dp @ ef  # P[a, k] = <anchor_a, e_k>
        grad_e += dp.T @ af[a0:a0 + ca]
    return grad_a.to(anchors.dtype), grad_e.to(emb.dtype)


def _mixpool_features(features: torch.Tensor) -> torch.Tensor:
    return features.to(_kernel_dtype(features)).contiguous()


def mixpool_forward(features, i, j, lam):
    """(pooled [M, C] in the features' dtype, argmax [M, C] int32 over H * W)."""
    ext = _extension()
    f = _mixpool_features(features)
    m, c = i.shape[0], f.shape[1]
    pooled = torch.empty(m, c, dtype=f.dtype, device=f.device)
    argmax = torch.empty(m, c, dtype=torch.int32, device=f.device)
    ext.mixpool_forward(f, i.to(torch.int64).contiguous(), j.to(torch.int64).contiguous(), float(lam), pooled, argmax)
    return pooled.to(features.dtype), argmax


def mixpool_backward(grad_pooled, features, i, j, lam, argmax):
    """grad_features [B, C, H, W]; each example gathers its mixed examples through a CSR of (i, j)."""
    ext = _extension()
    f = _mixpool_features(features)
    b = f.shape[0]
    i64, j64 = i.to(torch.int64).contiguous(), j.to(torch.int64).contiguous()
    both = torch.cat([i64, j64])
    order = torch.argsort(both, stable=True)
    offsets = torch.zeros(b + 1, dtype=torch.int64, device=f.device)
    offsets[1:] = torch.cumsum(torch.bincount(both, minlength=b), 0)
    grad = torch.empty(f.shape, dtype=torch.float32, device=f.device)
    ext.mixpool_backward(
        grad_pooled.to(f.dtype).contiguous(), f, i64, j64, float(lam), argmax.to(torch.int32).contiguous(),
        order, offsets, grad,
    )
    return grad.to(features.dtype)
