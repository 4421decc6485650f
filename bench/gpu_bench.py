"""Fused vs reference vs pytorch-metric-learning: fwd+bwd time and peak loss memory, one table.

    python bench/gpu_bench.py --out RESULTS_DIR [--backends triton,cuda] [--device cpu --tiny]

Rows: multi_similarity and contrastive, clean and Metrix embedding mixup over all pos-neg pairs,
B = 128..8192, d = 512; proxy_anchor with 100 and 10,000 proxies; proxy_nca with embedding mixup
(its mixes are anchors, made a block at a time), 100 proxies; the largest batch that fits with
all-pairs embedding mixup, fused vs reference; last, multi_similarity at B = 256 without the host's
per-call cost: through torch.compile(mode="reduce-overhead"), and as one CUDA graph of the whole
fwd+bwd (torch.cuda.graph around the eager call). Every column but PML's calls
metrix_loss(..., pairs="pos-neg", lam=0.4, backend=...), the user's path. Labels: 4 per class.
Ratios are computed within this run.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
import traceback


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder (markdown + CSV)")
    parser.add_argument("--backends", default="triton", help="comma-separated fused backends, e.g. triton,cuda")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a dry run of every code path)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds; later rows are skipped past it")
    return parser.parse_args()


ARGS = parse()
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import torch  # noqa: E402

from metrix_kernels import metrix_loss  # noqa: E402

try:
    import pytorch_metric_learning
    from pytorch_metric_learning import losses as pml_losses
except ImportError:
    pml_losses = None

DEVICE = torch.device(ARGS.device)
CUDA = DEVICE.type == "cuda"
D = 16 if ARGS.tiny else 512
BATCHES = [8, 24] if ARGS.tiny else [128, 256, 512, 1024, 2048, 4096, 8192]
PROXY_BATCHES = [8, 24] if ARGS.tiny else [256, 1024, 4096]
PROXY_COUNTS = [5, 40] if ARGS.tiny else [100, 10_000]
COMPILED_BATCHES = [8] if ARGS.tiny else [256]
COMPILED = "compiled"  # the first fused backend under torch.compile(mode="reduce-overhead")
GRAPHED = "+graph"  # suffix: that implementation's eager fwd+bwd captured in one CUDA graph
MAX_FIT = 64 if ARGS.tiny else 32_768  # the largest-batch search stops here
FIT_OVER_REFERENCE = 16  # and, for the fused paths, at this multiple of the reference's (the target is 8x)
SLOW_CALL = 2.0  # seconds: a cell whose call takes longer is timed once, and larger B are skipped
SLOW_FIT = 10.0  # seconds: the largest-batch search stops after a call this slow
LAM = 0.4
START = time.perf_counter()
ROWS: list[dict] = []


def inputs(b, proxies=0):
    gen = torch.Generator().manual_seed(b)
    emb = torch.randn(b, D, generator=gen).to(DEVICE).requires_grad_(True)
    labels = (torch.arange(b) // 4).to(DEVICE)
    if proxies:
        labels = labels % proxies
    prox = torch.randn(proxies, D, generator=gen).to(DEVICE).requires_grad_(True) if proxies else None
    return emb, labels, prox


def make_fn(impl, name, mode, emb, labels, prox):
    """A closure computing fwd+bwd once, or None when the implementation has no such case."""
    if impl == "pml":
        if pml_losses is None or mode != "clean":
            return None
        if name == "proxy_anchor":
            fn = pml_losses.ProxyAnchorLoss(prox.shape[0], D).to(DEVICE)
            fn.proxies.data.copy_(prox.detach())
        else:
            fn = {"multi_similarity": pml_losses.MultiSimilarityLoss, "contrastive": pml_losses.ContrastiveLoss}[name]()
        return lambda: fn(emb, labels).backward()
    mixup = None if mode == "clean" else "embedding"
    if impl == COMPILED:
        torch._dynamo.reset()  # each case compiles afresh, for its static shapes
        step = torch.compile(lambda e, y: metrix_loss(e, y, loss=name, mixup=mixup, pairs="pos-neg", lam=LAM,
                                                      proxies=prox, backend=ARGS.backends.split(",")[0]),
                             mode="reduce-overhead")

        def run_compiled():
            # as optimizer.zero_grad(set_to_none=True): the last step's gradient lives in the graphs' memory,
            # which this step's replay rewrites, so accumulating into it fails
            emb.grad = None
            step(emb, labels).backward()
        return run_compiled
    backend = impl.removesuffix(GRAPHED)

    def run():  # the user's call: metrix_loss with this backend ("reference" included)
        metrix_loss(emb, labels, loss=name, mixup=mixup, pairs="pos-neg", lam=LAM, proxies=prox,
                    backend=backend).backward()
    if impl.endswith(GRAPHED):
        return graphed(run, emb) if CUDA else None
    return run


def graphed(run, emb):
    """run's kernels, forward and backward, captured in one CUDA graph and replayed. The first call
    warms up on a side stream (torch.cuda.graph's requirement); the second captures, so that measure's
    peak is the graph's memory pool; later calls replay."""
    state = {}

    def fn():
        if "graph" not in state:
            if not state:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()
                torch.cuda.current_stream().wait_stream(side)
                state["warm"] = True
                return
            emb.grad = None  # captured as written, not accumulated
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                run()
        state["graph"].replay()
    return fn


def sync():
    if CUDA:
        torch.cuda.synchronize()


def measure(fn):
    """(ms per fwd+bwd, peak MB above the inputs): warm-up, then repeat for about 0.2 s (a call
    slower than SLOW_CALL is timed once: the peak-memory call)."""
    fn()
    sync()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else float("nan")
    if once > SLOW_CALL:
        return 1e3 * once, peak
    reps, total = 0, 0.0
    while reps < 3 or (total < 200.0 and reps < 50):
        if CUDA:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            total += begin.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            total += 1e3 * (time.perf_counter() - t0)
        reps += 1
        if ARGS.tiny:
            break
    return total / reps, peak


def attempt(impl, name, mode, b, proxies=0):
    """Measure one cell; out-of-memory, errors and missing cases are recorded, not raised. Each row keeps the
    cell's wall time (compilation and warm-up included), which says where the table's time goes."""
    status, ms, mb = "ok", float("nan"), float("nan")
    began = time.perf_counter()
    if began - START > ARGS.budget:
        status = "skipped: time budget"
    else:
        emb, labels, prox = inputs(b, proxies)
        try:
            fn = make_fn(impl, name, mode, emb, labels, prox)
            if fn is None:
                status = "n/a" if pml_losses is not None else "skipped: pytorch-metric-learning not importable"
            else:
                ms, mb = measure(fn)
        except torch.OutOfMemoryError:
            status = "OOM"
        except Exception as err:  # recorded, so that one broken case does not cost the rest of a GPU session
            traceback.print_exc()
            status = f"error: {type(err).__name__} (bench.log)"
        finally:
            emb = labels = prox = fn = None
            if CUDA:
                torch.cuda.empty_cache()
    ROWS.append(dict(loss=name, mode=mode, B=b, proxies=proxies, impl=impl, ms=ms, peak_mb=mb, status=status,
                     wall_s=round(time.perf_counter() - began, 2)))
    print(f"{time.perf_counter() - START:7.1f} s  {impl} {name} {mode} B={b} proxies={proxies}: {cell(ROWS[-1])}"
          f" ({ROWS[-1]['wall_s']} s)", flush=True)
    return status == "ok"


def largest_batch(impl, cap=MAX_FIT):
    """Doubling search for the largest B whose all-pairs embedding-mixed MS fwd+bwd fits, up to cap:
    (B, why the search stopped short of an out-of-memory error, or "")."""
    b, best, cut = 128 if not ARGS.tiny else 8, 0, ""
    began = time.perf_counter()
    while not cut:
        if b > cap:
            cut = f"search stopped at {cap}: at least this"
        elif time.perf_counter() - START > ARGS.budget + 60:
            cut = "time budget reached: at least this"
        if cut:
            break
        emb, labels, prox = inputs(b)
        try:
            t0 = time.perf_counter()
            make_fn(impl, "multi_similarity", "embedding", emb, labels, prox)()
            sync()
            best = b
            if time.perf_counter() - t0 > SLOW_FIT:
                cut = f"stopped after a call over {SLOW_FIT:.0f} s: at least this"
        except torch.OutOfMemoryError:
            break
        except Exception as err:  # recorded as where the search stopped
            traceback.print_exc()
            cut = f"error at B = {b}: {type(err).__name__} (bench.log)"
            break
        finally:
            emb = labels = prox = None
            if CUDA:
                torch.cuda.empty_cache()
        b *= 2
    print(f"{time.perf_counter() - START:7.1f} s  largest batch {impl}: {best} {cut}"
          f" ({time.perf_counter() - began:.1f} s)", flush=True)
    return best, cut


def card_limits():
    """Measured float32 matmul rate (TFLOP/s, TF32 off as torch's default) and copy bandwidth (GB/s)."""
    if not CUDA or ARGS.tiny:
        return None
    n = 8192
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    mm_ms, _ = measure(lambda: torch.mm(a, b))
    src = torch.empty(2**28, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_ms, _ = measure(lambda: dst.copy_(src))
    return 2 * n**3 / mm_ms / 1e9, 2 * src.numel() / copy_ms / 1e6


def main():
    fused = [name for name in ARGS.backends.split(",") if name]
    impls = fused + ["reference", "pml"]
    stop = {}  # (impl, loss, mode) -> why its larger batches are skipped

    def sweep(name, modes):
        for mode in modes:
            for b in BATCHES:
                for impl in impls:
                    if (impl, name, mode) in stop:
                        ROWS.append(dict(loss=name, mode=mode, B=b, proxies=0, impl=impl, ms=float("nan"),
                                         peak_mb=float("nan"), status=stop[impl, name, mode]))
                    elif not attempt(impl, name, mode, b) and ROWS[-1]["status"] == "OOM":
                        stop[impl, name, mode] = "skipped: OOM at a smaller B"
                    elif ROWS[-1]["ms"] > 1e3 * SLOW_CALL:
                        stop[impl, name, mode] = f"skipped: over {SLOW_CALL:.0f} s per call at a smaller B"

    # the targets first, and the table rewritten after each part, in case the time limit cuts the run
    limits = card_limits()
    sweep("multi_similarity", ("embedding", "clean"))
    write(fused, {}, limits)
    fits = {"reference": largest_batch("reference")}
    cap = min(MAX_FIT, FIT_OVER_REFERENCE * fits["reference"][0]) if fits["reference"][0] else MAX_FIT
    fits.update({impl: largest_batch(impl, cap) for impl in fused})
    write(fused, fits, limits)
    sweep("contrastive", ("clean", "embedding"))
    write(fused, fits, limits)
    for count in PROXY_COUNTS:
        for mode in ("clean", "embedding"):
            for b in PROXY_BATCHES:
                for impl in impls:
                    attempt(impl, "proxy_anchor", mode, b, count)
    for b in PROXY_BATCHES[:2]:
        for impl in impls:
            attempt(impl, "proxy_nca", "embedding", b, PROXY_COUNTS[0])
    write(fused, fits, limits)
    # last, as each case compiles for tens of seconds: the fixed per-call cost without Python and launches
    for mode in ("embedding", "clean"):
        for b in COMPILED_BATCHES:
            for impl in (fused[0], "reference"):
                attempt(impl + GRAPHED, "multi_similarity", mode, b)
            attempt(COMPILED, "multi_similarity", mode, b)
    write(fused, fits, limits)


def limit_lines(fused, limits):
    """How far the fused rows are from the card: clean rows as matmul work (fwd s = 2 B^2 d, bwd
    recomputes s and forms two gradients, 6 B^2 d) over the measured matmul rate; mixed rows as
    mixed-pair evaluations per second (fwd + the two backward passes) over the exp-unit rate."""
    if limits is None:
        return []
    tflops, gbs = limits
    # special-function units: 16 exp per clock per SM at the H100/H200 boost clock of 1.98 GHz
    exp_rate = 16 * torch.cuda.get_device_properties(DEVICE).multi_processor_count * 1.98e9
    lines = ["", f"Card limits measured in this run: float32 matmul {tflops:.1f} TFLOP/s, copy {gbs:.0f} GB/s.", "",
             "| impl | loss | mode | B | achieved | of the card |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        if row["impl"] not in fused or row["status"] != "ok" or row["proxies"]:
            continue
        b, sec = row["B"], row["ms"] / 1e3
        if row["mode"] == "clean":
            rate = 8 * b * b * D / sec / 1e12
            lines.append(f"| {row['impl']} | {row['loss']} | clean | {b} | {rate:.2f} TFLOP/s | {rate / tflops:.1%} |")
        else:
            rate = 3 * b * 4 * (b - 4) / sec  # anchors x (P(a) + {a}) x N(a), 4 per class; fwd + 2 bwd passes
            lines.append(f"| {row['impl']} | {row['loss']} | embedding | {b} | {rate / 1e9:.1f} G mixed-pair"
                         f" evaluations/s | {rate / exp_rate:.1%} of one exp per evaluation |")
    return lines


def compiled_lines(by, lead):
    """The rows without the host's per-call cost beside the same cases run eagerly."""
    rows = [r for r in ROWS if r["impl"] == COMPILED or r["impl"].endswith(GRAPHED)]
    if not rows:
        return []
    lines = ["", "Without the host's per-call cost: IMPL+graph = that implementation's eager fwd+bwd captured in one"
             " CUDA graph (torch.cuda.graph) and replayed, its peak the graph's memory pool; compiled ="
             f" {lead} under torch.compile(mode=\"reduce-overhead\"), CUDA graphs recorded on the second call,"
             " which gives the peak. Ratios against the eager reference, the graphed reference and PML:", "",
             "| loss | mode | B | how | ms / peak | eager | reference / this | reference+graph / this |"
             " this / pml |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["loss"], r["mode"], r["B"], r["proxies"])
        eager, ref, ref_graph, pml = (by.get(key + (i,)) for i in
                                      (r["impl"].removesuffix(GRAPHED).replace(COMPILED, lead), "reference",
                                       "reference" + GRAPHED, "pml"))
        ratio = lambda a, b: f"{a['ms'] / b['ms']:.2f}" if a and b and a["status"] == b["status"] == "ok" else ""
        lines.append(f"| {r['loss']} | {r['mode']} | {r['B']} | {r['impl']} | {cell(r)} | "
                     f"{cell(eager) if eager else ''} | {ratio(ref, r)} | {ratio(ref_graph, r)} | {ratio(r, pml)} |")
    return lines


def cell(row):
    if row["status"] != "ok":
        return row["status"]
    mem = "" if row["peak_mb"] != row["peak_mb"] else f" / {row['peak_mb']:.1f} MB"
    return f"{row['ms']:.3f} ms{mem}"


def write(fused, fits, limits=None):
    os.makedirs(ARGS.out, exist_ok=True)
    gpu = torch.cuda.get_device_name(DEVICE) if CUDA else platform.processor() or "cpu"
    header = [
        f"# Metrix fused loss benchmark ({gpu})",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}",
        f"- torch {torch.__version__}, triton {_version('triton')}, pytorch-metric-learning "
        f"{pytorch_metric_learning.__version__ if pml_losses else 'not importable (column skipped)'}",
        f"- written {time.perf_counter() - START:.0f} s after the start",
        f"- d = {D}, float32, fwd+bwd per call (CUDA events, after warm-up), peak = max_memory_allocated above the"
        " inputs; embedding = clean + 0.4 x Metrix embedding mixup over all pos-neg pairs, lam = 0.4;"
        " labels grouped 4 per class",
        "",
    ]
    impls = fused + ["reference", "pml"]
    keys = []
    for row in ROWS:
        key = (row["loss"], row["mode"], row["B"], row["proxies"])
        if key not in keys:
            keys.append(key)
    by = {(r["loss"], r["mode"], r["B"], r["proxies"], r["impl"]): r for r in ROWS}
    lead = fused[0] if fused else "reference"
    cols = ["loss", "mode", "B", "proxies"] + [f"{i} ms / peak" for i in impls] + [
        f"reference / {lead} time", f"{lead} / pml time", f"{lead} / pml peak, %"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key in keys:
        cells = [by[key + (i,)] for i in impls]
        f, r, p = by[key + (lead,)], by[key + ("reference",)], by[key + ("pml",)]
        ratio = lambda a, b, k, scale=1: (f"{scale * a[k] / b[k]:.2f}" if a["status"] == b["status"] == "ok" and b[k] > 0
                                          else "")
        lines.append("| " + " | ".join([key[0], key[1], str(key[2]), str(key[3] or "")] + [cell(c) for c in cells]
                                       + [ratio(r, f, "ms"), ratio(f, p, "ms"), ratio(f, p, "peak_mb", 100)]) + " |")
    fit_lines = ["", "Largest batch with all-pairs embedding mixup (multi_similarity, d = %d, fwd+bwd):" % D, ""]
    for impl, (best, cut) in fits.items():
        fit_lines.append(f"- {impl}: {best}{f' ({cut})' if cut else ''}")
    if fused and fits.get("reference", (0,))[0]:
        fit_lines.append(f"- ratio {lead} / reference: >= {fits[lead][0] / fits['reference'][0]:.0f}x")
    text = "\n".join(header + lines + fit_lines + compiled_lines(by, lead) + limit_lines(fused, limits)) + "\n"
    with open(os.path.join(ARGS.out, "gpu-bench.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(ARGS.out, "gpu-bench.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["gpu", "torch", "triton", "loss", "mode", "B", "proxies", "impl",
                                                    "ms", "peak_mb", "status", "wall_s"])
        writer.writeheader()
        for row in ROWS:
            writer.writerow(dict(gpu=gpu, torch=torch.__version__, triton=_version("triton"), **row))


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    main()
