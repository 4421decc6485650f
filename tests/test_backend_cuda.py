"""The cuda backend (metrix_kernels/backends/cuda.py) against the contract, computed independently.

Two implementations run the same cases:
- "host": csrc/cuda/host_check.cpp, the kernels' per-pair maths (pair_math.cuh) in their reduction
  order, compiled with g++ and standing in for the extension, so cuda.py's conversions, chunking and
  chain rule run on any machine;
- "device": the built extension on a GPU (the one legitimate skip: no device or no build).
"""
from __future__ import annotations

import ctypes
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metrix_kernels
from metrix_kernels import reference
from metrix_kernels.backends import (
    LABEL_DOMINANT, LABEL_INTERPOLATE, LABEL_NEGATIVE, MEMBER_ALL, MEMBER_ALL_BUT_SELF, MEMBER_ANC_NEG,
    MEMBER_NEG_NEG, MEMBER_POS_NEG, MEMBER_POS_POS, KernelConfig, cuda,
)
from metrix_kernels.family import FAMILY, resolve

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
LOSSES = sorted(FAMILY)
RULES = [MEMBER_POS_NEG, MEMBER_ANC_NEG, MEMBER_POS_POS, MEMBER_NEG_NEG]
LABELS = [LABEL_INTERPOLATE, LABEL_NEGATIVE, LABEL_DOMINANT]


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


class HostExtension:
    """The binding's functions over host_check.cpp (float32, CPU tensors)."""

    def __init__(self, lib):
        self.lib = lib

    def pairwise_forward(self, rows, cols, rli, rlj, ridx, cli, clj, cidx, mask, stats, *scalars):
        self._pairwise(rows, cols, rli, rlj, ridx, cli, clj, cidx, mask, stats, scalars, None, None, None, None)

    def pairwise_backward(self, rows, cols, rli, rlj, ridx, cli, clj, cidx, mask, stats, *rest):
        *scalars, gp, gn, grows, gcols = rest
        self._pairwise(rows, cols, rli, rlj, ridx, cli, clj, cidx, mask, stats, scalars, gp, gn, grows, gcols)

    def _pairwise(self, rows, cols, rli, rlj, ridx, cli, clj, cidx, mask, stats, scalars, gp, gn, grows, gcols):
        lam, member, label_mode, form, of, mixed_rows, ps, psh, ns, nsh = scalars
        rows, cols = rows.float().contiguous(), cols.float().contiguous()
        self.lib.host_pairwise(
            _ptr(rows), _ptr(cols), ctypes.c_int64(rows.shape[0]), ctypes.c_int64(cols.shape[0]),
            ctypes.c_int64(rows.shape[1]), *map(_ptr, (rli, rlj, ridx, cli, clj, cidx, mask, stats)),
            ctypes.c_float(lam), member, label_mode, form, of, int(mixed_rows),
            *map(ctypes.c_float, (ps, psh, ns, nsh)), *map(_ptr, (gp, gn, grows, gcols)),
        )

    def gram_forward(self, P, G, a0, i0, al, ai, lb, io, ir, stats, *scalars):
        self._gram(P, G, a0, i0, (al, ai, lb, io, ir, None, None), stats, scalars, None, None, None, None)

    def gram_backward(self, P, G, a0, i0, al, ai, lb, io, ir, ao, ar, stats, *rest):
        *scalars, gp, gn, dP, dG = rest
        self._gram(P, G, a0, i0, (al, ai, lb, io, ir, ao, ar), stats, scalars, gp, gn, dP, dG)

    def _gram(self, P, G, a0, i0, ints, stats, scalars, gp, gn, dP, dG):
        lam, member, label_mode, form, of, ps, psh, ns, nsh = scalars
        P, G = P.contiguous(), G.contiguous()
        al, lb = ints[0], ints[2]
        assert all(t is None or (t.dtype == torch.int32 and t.is_contiguous()) for t in ints)
        self.lib.host_gram(
            _ptr(P), _ptr(G), *map(ctypes.c_int64, (al.numel(), P.shape[0], G.shape[0], lb.numel(), a0, i0)),
            *map(_ptr, ints), _ptr(stats), ctypes.c_float(lam), member, label_mode, form, of,
            *map(ctypes.c_float, (ps, psh, ns, nsh)), *map(_ptr, (gp, gn, dP, dG)),
        )

    def mixpool_forward(self, features, i, j, lam, pooled, argmax):
        f = features.float().contiguous()
        out = torch.empty(pooled.shape, dtype=torch.float32)
        b, c, h, w = f.shape
        self.lib.host_mixpool_forward(_ptr(f), ctypes.c_int64(c), ctypes.c_int64(h * w), ctypes.c_int64(i.numel()),
                                      _ptr(i), _ptr(j), ctypes.c_float(lam), _ptr(out), _ptr(argmax))
        pooled.copy_(out)

    def mixpool_backward(self, grad_pooled, features, i, j, lam, argmax, order, offsets, grad):
        g = grad_pooled.float().contiguous()
        b, c, h, w = features.shape
        self.lib.host_mixpool_backward(_ptr(g), *map(ctypes.c_int64, (b, c, h * w, i.numel())), ctypes.c_float(lam),
                                       _ptr(argmax), _ptr(order), _ptr(offsets), _ptr(grad))


@pytest.fixture(scope="session")
def host_extension(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.fail("g++ is needed to build the host twin of the CUDA kernels")
    lib = tmp_path_factory.mktemp("host_check") / "host_check.so"
    subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-I", str(CSRC), str(CSRC / "host_check.cpp"),
                    "-o", str(lib)], check=True)
    return HostExtension(ctypes.CDLL(str(lib)))


@pytest.fixture(params=["host", "device"])
def impl(request, monkeypatch):
    """(device, extension) for the cases; the host twin also gets tiny chunks to exercise chunking."""
    if request.param == "host":
        host = request.getfixturevalue("host_extension")
        monkeypatch.setattr(cuda, "_extension", lambda: host)
        monkeypatch.setattr(cuda, "CHUNK_ELEMENTS", 40)  # 4 rows at B = 9: chunk edges inside classes
        return torch.device("cpu")
    if not cuda.available():
        pytest.skip(f"CUDA backend not available here: {cuda.unavailable_reason()}")
    return torch.device("cuda")


def _cfg(loss, member, label_mode=LABEL_INTERPOLATE, mixed_rows=False):
    _, terms, _ = resolve(loss, {})
    return terms, KernelConfig(terms.sigma_pos, terms.sigma_neg, member, label_mode, mixed_rows, True)


def _weights(member, label_mode, lam, z, a, li, lj, mi, mask=None):
    """The contract's pair weights in torch: clean side (z, a) [R, 1] or [1, V], mixed side likewise."""
    pi, pj = li == z, lj == z
    rules = {
        MEMBER_ALL: torch.ones_like(pi), MEMBER_ALL_BUT_SELF: mi != a, MEMBER_POS_NEG: pi & ~pj,
        MEMBER_ANC_NEG: (mi == a) & ~pj, MEMBER_POS_POS: pi & pj, MEMBER_NEG_NEG: ~pi & ~pj,
    }
    keep = (mask if mask is not None else rules[member]).double()
    if label_mode == LABEL_NEGATIVE:
        y = torch.zeros_like(keep)
    elif label_mode == LABEL_DOMINANT:
        y = (pi if lam >= 0.5 else pj).double()
    else:
        y = lam * pi.double() + (1 - lam) * pj.double()
    return keep * y, keep * (1 - y)


def _compare_stats(stats, ref):
    stats = stats.double().cpu()
    for k, name in enumerate(("pos_sum", "neg_sum", "pos_mass", "neg_mass")):
        torch.testing.assert_close(stats[k], getattr(ref, name).detach(), rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(stats[4], ref.pos_nnz.double(), msg="pos_nnz")
    torch.testing.assert_close(stats[5], ref.neg_nnz.double(), msg="neg_nnz")


def _term_grads(ref, leaves, gen):
    """Upstream gradients of the two term sums, and the reference's gradients of the leaves."""
    gp = torch.randn(ref.pos_sum.shape, generator=gen, dtype=torch.float64)
    gn = torch.randn(ref.neg_sum.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad([ref.pos_sum, ref.neg_sum], leaves, [gp, gn], allow_unused=True, retain_graph=True)
    return gp, gn, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _unit(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)


def _pairwise_case(kind, rule, gen):
    """rows, cols and the pair metadata (label_i, label_j, index of each side) of one test case."""
    b, d, classes = 11, 7, 3
    labels = torch.randint(classes, (b,), generator=gen)
    e = _unit(b, d, gen)
    idx = torch.arange(b)
    proxies, plab, pidx = _unit(classes, d, gen), torch.arange(classes), torch.full((classes,), -1)
    if kind == "clean":
        return (e, labels, labels, idx), (e.clone(), labels, labels, idx), MEMBER_ALL_BUT_SELF, False, 1.0
    if kind == "proxy_anchors":
        return (proxies, plab, plab, pidx), (e, labels, labels, idx), MEMBER_ALL, False, 1.0
    i = torch.randint(b, (23,), generator=gen)
    j = (i + torch.randint(1, b, (23,), generator=gen)) % b  # i != j, as in every mixing plan
    lam = 0.3 + 0.4 * torch.rand((), generator=gen, dtype=torch.float64).item()
    m = F.normalize(lam * e[i] + (1 - lam) * e[j], dim=1)
    if kind == "mixed_cols":
        return (e, labels, labels, idx), (m, labels[i], labels[j], i), rule, False, lam
    return (m, labels[i], labels[j], i), (proxies, plab, plab, pidx), MEMBER_ALL, True, lam  # mixed_rows


# clean pairs are labelled by interpolation with lam = 1 only
PAIRWISE_CASES = [("clean", None, LABEL_INTERPOLATE), ("proxy_anchors", None, LABEL_INTERPOLATE)] + [
    ("mixed_rows", None, mode) for mode in LABELS
] + [("mixed_cols", rule, mode) for rule in RULES for mode in LABELS]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind,rule,label_mode", PAIRWISE_CASES)
def test_pairwise(impl, loss, kind, rule, label_mode):
    gen = torch.Generator().manual_seed(hash((loss, kind, rule, label_mode)) % 2**31)
    (rows, rli, rlj, ridx), (cols, cli, clj, cidx), member, mixed_rows, lam = _pairwise_case(kind, rule, gen)
    terms, cfg = _cfg(loss, member, label_mode, mixed_rows)
    rows, cols = rows.requires_grad_(), cols.requires_grad_()
    if mixed_rows:
        wp, wn = _weights(member, label_mode, lam, cli[None], cidx[None], rli[:, None], rlj[:, None], ridx[:, None])
    else:
        wp, wn = _weights(member, label_mode, lam, rli[:, None], ridx[:, None], cli[None], clj[None], cidx[None])
    ref = reference.term_stats(rows @ cols.T, wp, wn, terms)
    gp, gn, (ref_rows, ref_cols) = _term_grads(ref, [rows, cols], gen)

    dev = impl
    meta = [t.to(dev) for t in (rli, rlj, ridx)], [t.to(dev) for t in (cli, clj, cidx)]
    r32, c32 = rows.detach().float().to(dev), cols.detach().float().to(dev)
    stats = cuda.pairwise_forward(r32, *meta[0], c32, *meta[1], lam, cfg)
    _compare_stats(stats, ref)
    grad_rows, grad_cols = cuda.pairwise_backward(r32, *meta[0], c32, *meta[1], lam, cfg, stats, gp.float().to(dev),
                                                  gn.float().to(dev))
    torch.testing.assert_close(grad_rows.double().cpu(), ref_rows, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(grad_cols.double().cpu(), ref_cols, rtol=1e-3, atol=1e-4)


def test_pairwise_d2_at_zero_distance(impl):
    """s = 1 exactly, the kink of d2 = max(2 - 2s, 0): the reference's derivative there, 0."""
    rows = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    cols = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    rl, ri, cl, ci = torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([1, 2])
    terms, cfg = _cfg("nca", MEMBER_ALL)
    wp, wn = _weights(MEMBER_ALL, LABEL_INTERPOLATE, 1.0, rl[:, None], ri[:, None], cl[None], cl[None], ci[None])
    ref = reference.term_stats(rows @ cols.T, wp, wn, terms)
    gp, gn = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    ref_rows, ref_cols = torch.autograd.grad([ref.pos_sum, ref.neg_sum], [rows, cols], [gp, gn])
    dev = impl
    meta = [t.to(dev) for t in (rl, rl, ri)], [t.to(dev) for t in (cl, cl, ci)]
    r32, c32 = rows.detach().float().to(dev), cols.detach().float().to(dev)
    stats = cuda.pairwise_forward(r32, *meta[0], c32, *meta[1], 1.0, cfg)
    grad_rows, grad_cols = cuda.pairwise_backward(r32, *meta[0], c32, *meta[1], 1.0, cfg, stats, gp.float().to(dev),
                                                  gn.float().to(dev))
    torch.testing.assert_close(grad_rows.double().cpu(), ref_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_cols.double().cpu(), ref_cols, rtol=1e-5, atol=1e-6)


def test_pairwise_tiny_lam(impl):
    """lam below float32's resolution at 1: a pair whose soft label is 1 - lam keeps its negative
    weight lam (1 - y by subtraction would be 0 and drop the pair from the negative term)."""
    gen = torch.Generator().manual_seed(3)
    labels, idx = torch.tensor([0, 0, 1, 1, 2, 2]), torch.arange(6)
    e = _unit(6, 5, gen)
    i, j = torch.tensor([0, 2, 4, 1]), torch.tensor([2, 4, 0, 5])
    lam = 1e-12
    m = F.normalize(lam * e[i] + (1 - lam) * e[j], dim=1)
    terms, cfg = _cfg("multi_similarity", MEMBER_ALL)
    wp, wn = _weights(MEMBER_ALL, LABEL_INTERPOLATE, lam, labels[:, None], idx[:, None], labels[i][None],
                      labels[j][None], i[None])
    ref = reference.term_stats(e @ m.T, wp, wn, terms)
    dev = impl
    stats = cuda.pairwise_forward(e.float().to(dev), labels.to(dev), labels.to(dev), idx.to(dev), m.float().to(dev),
                                  labels[i].to(dev), labels[j].to(dev), i.to(dev), lam, cfg)
    _compare_stats(stats, ref)


def test_pairwise_member_mask(impl):
    gen = torch.Generator().manual_seed(5)
    (rows, rli, rlj, ridx), (cols, cli, clj, cidx), _, _, lam = _pairwise_case("mixed_cols", MEMBER_POS_NEG, gen)
    mask = torch.rand(rows.shape[0], cols.shape[0], generator=gen) < 0.4
    terms, cfg = _cfg("multi_similarity", MEMBER_POS_NEG)
    wp, wn = _weights(None, LABEL_INTERPOLATE, lam, rli[:, None], ridx[:, None], cli[None], clj[None], cidx[None], mask)
    ref = reference.term_stats(rows @ cols.T, wp, wn, terms)
    dev = impl
    stats = cuda.pairwise_forward(rows.float().to(dev), rli.to(dev), rlj.to(dev), ridx.to(dev), cols.float().to(dev),
                                  cli.to(dev), clj.to(dev), cidx.to(dev), lam, cfg, member_mask=mask.to(dev))
    _compare_stats(stats, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pairwise_half_inputs(impl, dtype):
    gen = torch.Generator().manual_seed(7)
    (rows, rli, rlj, ridx), (cols, cli, clj, cidx), member, _, lam = _pairwise_case("clean", None, gen)
    rows, cols = rows.to(dtype).double(), cols.to(dtype).double()  # the values the kernel sees
    terms, cfg = _cfg("multi_similarity", member)
    wp, wn = _weights(member, LABEL_INTERPOLATE, lam, rli[:, None], ridx[:, None], cli[None], clj[None], cidx[None])
    ref = reference.term_stats(rows @ cols.T, wp, wn, terms)
    dev = impl
    stats = cuda.pairwise_forward(rows.to(dtype).to(dev), rli.to(dev), rlj.to(dev), ridx.to(dev),
                                  cols.to(dtype).to(dev), cli.to(dev), clj.to(dev), cidx.to(dev), lam, cfg)
    _compare_stats(stats, ref)


# the ops layer maps anc-neg to pos-neg for proxy anchors
GRAM_CASES = [(anchors, rule) for anchors in ("examples", "proxies") for rule in RULES
              if not (anchors == "proxies" and rule == MEMBER_ANC_NEG)]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("anchors,rule", GRAM_CASES)
@pytest.mark.parametrize("label_mode", LABELS)
def test_gram_mixed(impl, loss, anchors, rule, label_mode):
    gen = torch.Generator().manual_seed(hash((loss, rule, label_mode, anchors)) % 2**31)
    b, d, classes = 9, 5, 3
    labels = torch.randint(classes, (b,), generator=gen)
    raw_e = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    if anchors == "examples":
        raw_a, alab, aidx = raw_e.detach().clone().requires_grad_(), labels, torch.arange(b)
    else:
        raw_a = torch.randn(classes, d, generator=gen, dtype=torch.float64, requires_grad=True)
        alab, aidx = torch.arange(classes), torch.full((classes,), -1)
    lam = 0.2 + 0.6 * torch.rand((), generator=gen, dtype=torch.float64).item()
    e, a = F.normalize(raw_e, dim=1), F.normalize(raw_a, dim=1)
    ii, jj = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    keep = ii < jj if rule in (MEMBER_POS_POS, MEMBER_NEG_NEG) else ii != jj
    i, j = ii[keep], jj[keep]
    m = F.normalize(lam * e[i] + (1 - lam) * e[j], dim=1)
    terms, cfg = _cfg(loss, rule, label_mode)
    wp, wn = _weights(rule, label_mode, lam, alab[:, None], aidx[:, None], labels[i][None], labels[j][None], i[None])
    ref = reference.term_stats(a @ m.T, wp, wn, terms)
    gp, gn, (ref_a, ref_e) = _term_grads(ref, [raw_a, raw_e], gen)

    dev = impl
    a32, e32 = a.detach().float().to(dev), e.detach().float().to(dev)
    meta = (alab.to(dev), aidx.to(dev))
    stats = cuda.gram_mixed_forward(a32, *meta, e32, labels.to(dev), lam, cfg)
    _compare_stats(stats, ref)
    grad_a, grad_e = cuda.gram_mixed_backward(a32, *meta, e32, labels.to(dev), lam, cfg, stats, gp.float().to(dev),
                                              gn.float().to(dev))
    # the backend's gradients are with respect to the unit vectors: carry them through the normalization
    got_a = torch.autograd.grad(a, raw_a, grad_a.double().cpu(), retain_graph=True)[0]
    got_e = torch.autograd.grad(e, raw_e, grad_e.double().cpu(), retain_graph=True)[0]
    torch.testing.assert_close(got_a, ref_a, rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(got_e, ref_e, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("rule", RULES)
def test_gram_groups_cover_every_member(rule):
    """The lists that confine the Gram kernels' loops: anchor a's i of the chunk [lo, hi) hold every i
    of a member triple (a, i, j), only i of a's group, ascending; likewise each i's anchors."""
    gen = torch.Generator().manual_seed(rule)
    b, lo, hi = 14, 3, 11
    labels = torch.tensor([7, -2, 40])[torch.randint(3, (b,), generator=gen)].int()
    alab = torch.cat([labels, torch.tensor([3], dtype=torch.int32)])  # and an anchor of a class not in the batch
    aidx = torch.cat([torch.arange(b), torch.tensor([-1])]).int()
    lam = 0.4
    i, j = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    wp, wn = _weights(rule, LABEL_INTERPOLATE, lam, alab[:, None, None], aidx[:, None, None], labels[i][None],
                      labels[j][None], i[None])
    candidate = i < j if rule in (MEMBER_POS_POS, MEMBER_NEG_NEG) else i != j
    member = ((wp > 0) | (wn > 0)) & candidate  # [A, B, B]
    key_a, key_e = cuda._group_keys(rule, alab, aidx, labels)
    emb_groups, anchor_groups = cuda._Groups(key_e), cuda._Groups(key_a)
    i_range = emb_groups.ranges(key_a, lo, hi)
    for a in range(alab.numel()):
        listed = emb_groups.order[i_range[0, a]:i_range[1, a]]
        assert listed.tolist() == sorted(k for k in range(lo, hi) if key_e[k] == key_a[a])
        assert set(listed.tolist()) >= set(member[a, lo:hi].any(1).nonzero().flatten().add(lo).tolist())
    a_range = anchor_groups.ranges(key_e, 2, 9)
    for k in range(b):
        listed = anchor_groups.order[a_range[0, k]:a_range[1, k]]
        assert listed.tolist() == sorted(a for a in range(2, 9) if key_a[a] == key_e[k])
        assert set(listed.tolist()) >= set(member[2:9, k].any(1).nonzero().flatten().add(2).tolist())
    if rule in (MEMBER_POS_NEG, MEMBER_ANC_NEG):  # sparse: no triple is visited in vain for its i
        assert (i_range[1] - i_range[0]).sum() == member[:, lo:hi].any(2).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixpool(impl, dtype):
    gen = torch.Generator().manual_seed(3)
    b, c, h, w = 5, 6, 3, 4
    features = torch.randn(b, c, h, w, generator=gen).to(dtype).double().requires_grad_()
    pairs = torch.tensor(list(itertools.permutations(range(b), 2)))[::2]
    i, j, lam = pairs[:, 0], pairs[:, 1], 0.35
    mixed = lam * features[i] + (1 - lam) * features[j]
    ref = mixed.mean(dim=(2, 3)) + mixed.amax(dim=(2, 3))
    grad_pooled = torch.randn(ref.shape, generator=gen).to(dtype).double()
    (ref_grad,) = torch.autograd.grad(ref, features, grad_pooled)

    dev = impl
    f = features.detach().to(dtype).to(dev)
    pooled, argmax = cuda.mixpool_forward(f, i.to(dev), j.to(dev), lam)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    assert pooled.dtype == dtype
    torch.testing.assert_close(pooled.double().cpu(), ref.detach(), **tol)
    grad = cuda.mixpool_backward(grad_pooled.to(dtype).to(dev), f, i.to(dev), j.to(dev), lam, argmax)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double().cpu(), ref_grad, **tol)


def test_missing_extension_is_a_warning_not_an_error(monkeypatch, caplog):
    monkeypatch.setattr(cuda, "_state", {"loaded": False, "ext": None, "reason": None})
    monkeypatch.setitem(sys.modules, "metrix_kernels._cuda", None)  # import fails
    monkeypatch.delattr(metrix_kernels, "_cuda", raising=False)  # an earlier successful import
    with caplog.at_level("WARNING"):
        assert not cuda.available()
    assert "CUDA backend unavailable" in caplog.text
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda.pairwise_forward(*[None] * 9, cfg=None)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mixup,pairs", [(None, "pos-neg"), ("embedding", "pos-neg"), ("embedding", "anc-neg"),
                                         ("embedding", "pos-pos"), ("embedding", "neg-neg"), ("feature", "pos-neg"),
                                         ("input", "anc-neg")])
def test_metrix_loss_end_to_end_on_device(loss, mixup, pairs):
    """metrix_loss(backend="cuda") through the ops layer equals the reference, loss and gradients."""
    if not cuda.available():
        pytest.skip(f"CUDA backend not available here: {cuda.unavailable_reason()}")
    from metrix_kernels import metrix_loss

    gen = torch.Generator().manual_seed(11)
    b, d, classes, c = 12, 16, 4, 8
    labels = torch.randint(classes, (b,), generator=gen).cuda()
    emb = torch.randn(b, d, generator=gen).cuda().requires_grad_()
    features = torch.randn(b, c, 3, 3, generator=gen).cuda().requires_grad_()
    inputs = torch.randn(b, c, generator=gen).cuda()
    head = torch.nn.Linear(c, d).cuda()
    row = FAMILY[loss]
    proxies = torch.randn(classes, d, generator=gen).cuda().requires_grad_() if row.uses_proxies else None
    extra = {"features": features, "head": head} if mixup == "feature" else {}
    if mixup == "input":
        extra = {"inputs": inputs, "model": head}
    results = []
    for backend in ("reference", "cuda"):
        value = metrix_loss(emb, labels, loss=loss, mixup=mixup, pairs=pairs, lam=0.4, proxies=proxies,
                            backend=backend, **extra)
        leaves = [x for x in (emb, features, proxies) if x is not None]
        results.append((value, torch.autograd.grad(value, leaves, allow_unused=True)))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
