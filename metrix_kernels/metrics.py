"""Evaluation measures of the paper (SPEC 1.5): Recall@K, alignment, uniformity, utilization,
positivity of mixed embeddings (empirical, and the CDF estimate of eq. 11 / 25).

Embeddings are compared by cosine similarity, so every function normalizes its inputs first.
Nearest-neighbour search uses faiss (a GPU index when faiss was built with GPU support and the
embeddings live on a GPU) and falls back to an exact chunked torch search when faiss is absent.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .family import assemble, resolve
from .pairs import rule_member, soft_labels
from .reference import term_stats

try:  # faiss is optional at import time: GPU machines may lack it
    import faiss
except ImportError:  # pragma: no cover - depends on the machine
    faiss = None


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.detach().float(), dim=1)


def nearest(query: torch.Tensor, base: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) [Q, k] of the k most cosine-similar rows of base for each query."""
    q, b = _unit(query), _unit(base)
    k = min(k, b.shape[0])
    if faiss is not None:
        index = faiss.IndexFlatIP(b.shape[1])
        if q.is_cuda and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), q.device.index or 0, index)
        index.add(np.ascontiguousarray(b.cpu().numpy()))
        sims, idx = index.search(np.ascontiguousarray(q.cpu().numpy()), k)
        return torch.from_numpy(sims), torch.from_numpy(idx)
    sims, idx = [], []
    for chunk in q.split(4096):
        s, i = (chunk @ b.T).topk(k, dim=1)
        sims.append(s.cpu())
        idx.append(i.cpu())
    return torch.cat(sims), torch.cat(idx)


def recall_at_k(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    gallery: Optional[torch.Tensor] = None,
    gallery_labels: Optional[torch.Tensor] = None,
) -> dict[int, float]:
    """Recall@K in percent: a query counts if one of its K nearest neighbours shares its class.

    Without a gallery every test embedding is a query against all others (itself excluded: the
    CUB, Cars and SOP protocol); with one (In-Shop) queries search the gallery only.
    """
    labels = labels.cpu()
    kmax = max(ks)
    if gallery is None:
        _, idx = nearest(embeddings, embeddings, kmax + 1)
        # drop the query itself wherever the search returned it, else the farthest neighbour
        own = idx == torch.arange(idx.shape[0])[:, None]
        keep = torch.where(own.any(1, keepdim=True), ~own, torch.arange(idx.shape[1]) < idx.shape[1] - 1)
        idx = idx[keep].view(idx.shape[0], -1)
        neighbour_labels = labels[idx]
    else:
        _, idx = nearest(embeddings, gallery, kmax)
        neighbour_labels = gallery_labels.cpu()[idx]
    hit = neighbour_labels == labels[:, None]
    return {k: 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


def alignment(embeddings: torch.Tensor, labels: torch.Tensor, max_pairs: int = 1_000_000) -> float:
    """Wang & Isola's alignment: mean |f(x) - f(y)|^2 over positive pairs (lower is better)."""
    e, labels = _unit(embeddings), labels.to(embeddings.device)
    total, count = 0.0, 0
    for start in range(0, e.shape[0], 1024):
        rows = slice(start, start + 1024)
        d2 = (2.0 - 2.0 * e[rows] @ e.T).clamp_min(0)
        pos = labels[rows, None] == labels[None, :]
        pos[torch.arange(d2.shape[0]), torch.arange(start, start + d2.shape[0])] = False
        total += d2[pos].sum().item()
        count += int(pos.sum())
        if count >= max_pairs:
            break
    return total / max(count, 1)


def uniformity(embeddings: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola's uniformity: log mean exp(-t |f(x) - f(y)|^2) over distinct pairs (lower is better)."""
    e = _unit(embeddings)
    n = e.shape[0]
    log_terms = []
    for start in range(0, n, 1024):
        d2 = (2.0 - 2.0 * e[start : start + 1024] @ e.T).clamp_min(0)
        off = torch.ones_like(d2, dtype=torch.bool)
        off[torch.arange(d2.shape[0]), torch.arange(start, start + d2.shape[0])] = False
        log_terms.append(torch.logsumexp(-t * d2[off], dim=0))
    return (torch.logsumexp(torch.stack(log_terms), dim=0) - math.log(n * (n - 1))).item()


def utilization(test: torch.Tensor, train: torch.Tensor) -> float:
    """Paper eq. 12: mean over test queries of the Euclidean distance to the nearest training embedding."""
    sims, _ = nearest(test, train, 1)
    return torch.sqrt((2.0 - 2.0 * sims[:, 0]).clamp_min(0)).mean().item()


def positivity_threshold(loss: str, lam: np.ndarray, **loss_params) -> Optional[np.ndarray]:
    """Similarity below which a single mixed pos-neg embedding behaves as positive (paper eq. 25).

    For sigma_pos = exp(a_p s + b_p), sigma_neg = exp(a_n s + b_n) and rho = c log(1 + x) with
    c_p a_p = -c_n a_n, dl~/ds <= 0 iff lam e^(a_p s + b_p) >= (1 - lam) e^(a_n s + b_n), that is
    s <= (logit(lam) + b_p - b_n) / (a_n - a_p). Multi-similarity: base + logit(lam) / (alpha + beta);
    proxy anchor: logit(lam) / (2 alpha). None for losses without this form. Like the paper's
    derivation it considers one mixed embedding and ignores how the reduction weighs the two
    terms (proxy anchor averages them over different numbers of proxies).
    """
    row, terms, _ = resolve(loss, loss_params)
    sp, sn, rp, rn = terms.sigma_pos, terms.sigma_neg, terms.rho_pos, terms.rho_neg
    if not (sp.form == sn.form == "exp" and sp.of == sn.of == "s" and rp.form == rn.form == "log1p"):
        return None
    if not math.isclose(rp.scale * sp.scale, -rn.scale * sn.scale):
        return None
    with np.errstate(divide="ignore"):
        logit = np.log(lam) - np.log1p(-lam)
    return (logit + sp.shift - sn.shift) / (sn.scale - sp.scale)


def positivity(
    loss: str,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    mixed: torch.Tensor,
    label_i: torch.Tensor,
    label_j: torch.Tensor,
    lam: float,
    proxies: Optional[torch.Tensor] = None,
    **loss_params,
) -> dict[str, float]:
    """Positivity of pos-neg mixed embeddings at one lam (paper section 3.6, Figure 2).

    anchors [B, d] with labels (clean examples; ignored for proxy losses, whose anchors or
    candidates are the proxies), mixed [M, d] = mix of pairs (i, j) with lam on i.
    empirical: fraction of (anchor, mixed) pairs of the pos-neg sets with dl~/ds <= 0, where l~
    is the loss's mixed term (eq. 9) over all those mixed embeddings.
    cdf: the estimate of eq. 25, F_lam(threshold), with F_lam the empirical CDF of the same
    similarities; NaN when the loss has no such estimate.
    """
    row, terms, params = resolve(loss, loss_params)
    m = _unit(mixed)
    if row.candidates == "proxies":
        # the mixed embedding is the anchor; its "anchor" of the positivity event is the proxy of y_i
        p = _unit(proxies)
        classes = torch.arange(p.shape[0], device=m.device)
        y = soft_labels(classes, label_i, label_j, lam, "interpolate", m.dtype).T
        sim = (m @ p.T).requires_grad_(True)
        loss_value = assemble(row, terms, term_stats(sim, y, 1.0 - y, terms))
        grad = torch.autograd.grad(loss_value, sim)[0]
        pick = torch.arange(m.shape[0], device=m.device), label_i
        g, s = grad[pick], sim.detach()[pick]
    else:
        if row.anchors == "proxies":
            a = _unit(proxies)
            a_labels = torch.arange(a.shape[0], device=m.device)
        else:
            a, a_labels = _unit(anchors), anchor_labels
        member = rule_member("pos-neg", a_labels, None, label_i, label_j, None)
        y = soft_labels(a_labels, label_i, label_j, lam, "interpolate", m.dtype)
        w = member.to(m.dtype)
        sim = (a @ m.T).requires_grad_(True)
        loss_value = assemble(row, terms, term_stats(sim, w * y, w * (1.0 - y), terms))
        grad = torch.autograd.grad(loss_value, sim)[0]
        g, s = grad[member], sim.detach()[member]
    out = {"lam": lam, "pairs": int(g.numel()), "empirical": float("nan"), "cdf": float("nan")}
    if g.numel() == 0:
        return out
    out["empirical"] = (g <= 0).float().mean().item()
    threshold = positivity_threshold(loss, np.array([lam]), **params)
    if threshold is not None:
        out["cdf"] = (s <= float(threshold[0])).float().mean().item()
    return out
