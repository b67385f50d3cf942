"""k-means for the codebooks: a greedy k-means++ start and full-batch Lloyd steps in torch (so that it
also runs on a GPU), deterministic for a seed, and the nearest-centroid assignment that encoding uses."""
import math

import torch

from imagegpt.errors import UserError


def assign(x, c, chunk=None):
    """Nearest centroid for each row of x (n, D) among c (k, D): (labels (n,), squared distance (n,)).
    argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c), one fused addmm per chunk of rows; the default
    chunk keeps each (chunk, k) block of distances near 2 MB, so it stays in cache for the min.
    Always in the inputs' precision: under a caller's bf16 autocast the distances would be rounded and
    images would get other codes than prepare.prepare gave them."""
    chunk = chunk or max(256, (1 << 19) // max(len(c), 1))
    c_sq = c.pow(2).sum(1)
    labels, dists = [], []
    with torch.autocast(x.device.type, enabled=False):
        for i in range(0, len(x), chunk):
            xi = x[i:i + chunk]
            d, l = torch.addmm(c_sq, xi, c.T, alpha=-2).min(1)
            labels.append(l)
            dists.append((d + xi.pow(2).sum(1)).clamp_min_(0))
    return torch.cat(labels), torch.cat(dists)


def _draw(weights, trials, g):
    """`trials` indices drawn with replacement with probability proportional to weights (n,),
    by inverse transform sampling: uniform draws from the CPU generator g, searched in the
    cumulative sum (float64). All-zero weights draw uniformly."""
    cum = weights.double().cumsum(0)
    total = cum[-1].item()
    if not total > 0:
        return torch.randint(len(weights), (trials,), generator=g).to(weights.device)
    r = torch.rand(trials, generator=g, dtype=torch.float64).to(weights.device) * total
    return torch.searchsorted(cum, r, right=True).clamp_max_(len(weights) - 1)


def kmeans(x, k, iters=30, seed=0, tol=1e-4, progress=None):
    """k-means with a greedy k-means++ start and full-batch Lloyd steps. x (n, D) float32 on any
    device. Deterministic for a seed on a given device. Returns (centroids (k, D), inertia).
    progress(phase, done, total): called when each phase begins (done 0) and after each of its steps;
    phase "k-means++ start" has k - 1 steps, "Lloyd iterations" at most `iters` (it may stop early).

    Identical rows are merged first and the distinct rows carry their counts as weights (weighted
    k-means++ sampling, weighted means): the same objective and the same steps as on the full
    multiset, at the cost of the distinct rows only (image features repeat a lot: blank patches)."""
    n = len(x)
    if n < k:
        raise UserError(f"k-means needs at least {k} feature vectors, got {n}")
    g = torch.Generator().manual_seed(seed)
    x, w = torch.unique(x, dim=0, return_counts=True)     # distinct rows (sorted), multiplicities
    w = w.to(x.dtype)
    m = len(x)
    trials = 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[_draw(w, 1, g)[0]]
    x_sq = x.pow(2).sum(1)
    closest = assign(x, centroids[:1])[1]
    if progress:
        progress("k-means++ start", 0, k - 1)
    for i in range(1, k):  # each step: sample candidates by D^2, keep the one that lowers the potential most
        cand = _draw(closest * w, trials, g)
        d = torch.addmm(x_sq[cand, None], x[cand], x.T, alpha=-2).add_(x_sq)   # (trials, m) distances
        d = torch.minimum(d, closest, out=d)               # each point's distance after adding a candidate
        best = (d @ w).argmin()                            # the candidate with the lowest potential
        centroids[i] = x[cand[best]]
        closest = d[best].clamp_min_(0)                    # (rounding can leave tiny negatives)
        if progress:
            progress("k-means++ start", i, k - 1)
    xw = x * w[:, None]
    prev = None
    if progress:
        progress("Lloyd iterations", 0, iters)
    for it in range(iters):
        labels, d = assign(x, centroids)
        inertia = (d @ w).item()
        sums = torch.zeros_like(centroids).index_add_(0, labels, xw)
        counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, w)
        empty = (counts == 0).nonzero().flatten()
        centroids = sums / counts.clamp_min(1)[:, None]
        if len(empty):  # re-seed empty clusters at the points farthest from their centroid
            far = d.argsort(descending=True)               # (fewer distinct rows than empties: reuse)
            centroids[empty] = x[far[torch.arange(len(empty), device=x.device) % m]]
        if progress:
            progress("Lloyd iterations", it + 1, iters)
        if prev is not None and len(empty) == 0 and prev - inertia <= tol * prev:
            break
        prev = inertia
    labels, d = assign(x, centroids)
    return centroids, (d @ w).item()
