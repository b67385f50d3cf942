"""The k-means benchmark (bench.py --only kmeans): our k-means (imagegpt/kmeans.py) against scikit-learn's
KMeans under the same rule, on the per-pixel features of the built-in training digits (or random blobs),
the final inertias computed by one float64 function."""
from contextlib import nullcontext

import torch

from imagegpt import sources, splits
from imagegpt.codebook_config import CodebookConfig
from imagegpt.errors import UserError
from imagegpt.kmeans import assign, kmeans
from imagegpt.measure import alternate, median
from tokenizer import Codebook, uint8_to_tensor


KMEANS_FEATURES = ("per-pixel features (patch_size 1) of the built-in training digits: position (x, y), "
                   "intensity, gradient (Gx, Gy); each group standardised, weight 1; time left out (0)")


def kmeans_data(n, source="digits", seed=0):
    """n feature vectors (float32, CPU) and a description. source: digits (the built-in training
    images through Codebook.fit_data) or random (Gaussian blobs, for tests without the digits)."""
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(50, 5, generator=g) * 3
        x = centres[torch.randint(50, (n,), generator=g)] + torch.randn(n, 5, generator=g)
        return x, "random: 50 Gaussian blobs in 5 dimensions"
    images, labels, _, _ = sources.load_builtin()
    train, _ = splits.stratified_split(labels, 0.2, 0)
    cfg = CodebookConfig(patch_size=1, w_position=1.0, w_time=0.0, w_colour=1.0, w_gradient=1.0,
                         fit_samples=n, codebook_seed=seed)
    imgs = uint8_to_tensor(images[train])
    if n > len(imgs) * imgs.shape[2] * imgs.shape[3]:
        raise UserError(f"--kmeans_n {n} is more than the {len(imgs) * imgs.shape[2] * imgs.shape[3]} pixels")
    _, x, _ = Codebook.fit_data(imgs, cfg)
    return x.contiguous(), KMEANS_FEATURES


def inertia(x, c):
    """Sum of squared distances to the nearest centroid, in float64 (the same function for both)."""
    return assign(x.double(), torch.as_tensor(c).double())[1].sum().item()


def bench_kmeans(x, k, iters, timing, threads=None, device=torch.device("cpu")):
    """Our tokenizer.kmeans vs scikit-learn's KMeans under the same rule: k-means++ start, then `iters`
    Lloyd iterations on both sides (our relative-inertia tolerance and scikit-learn's centre-shift
    tolerance both 0, so neither stops early unless nothing moves)."""
    from sklearn.cluster import KMeans   # optional: only the benchmark compares with scikit-learn
    try:
        from threadpoolctl import threadpool_limits   # scikit-learn's, to hold it to our threads
        limit = (lambda: threadpool_limits(limits=threads)) if threads else nullcontext
    except ImportError:
        limit = nullcontext
    xn, xd = x.numpy(), x.to(device)     # ours runs where the project fits codebooks (prepare.prepare)
    res = {}

    def ours():
        done = []
        res["ours"] = kmeans(xd, k, iters=iters, seed=0, tol=0.0, progress=lambda phase, i, n: done.append(phase == "Lloyd iterations" and i > 0))[0].cpu()
        res["ours_iters"] = sum(done)

    def theirs():
        with limit():
            km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=0, max_iter=iters, tol=0.0).fit(xn)
        res["theirs"] = km.cluster_centers_
        res["theirs_iters"] = int(km.n_iter_)

    times, cpu = alternate({"ours": ours, "theirs": theirs}, timing.reps, device, label=timing.label)
    i_o, i_t = inertia(x, res["ours"]), inertia(x, res["theirs"])
    t_o, t_t = median(times["ours"]), median(times["theirs"])
    return {"n": len(x), "dim": x.shape[1], "k": k, "device": {"ours": str(device), "theirs": "cpu"}, "distinct_vectors": len(torch.unique(x, dim=0)),
            "iters": {"ours": res["ours_iters"], "theirs": res["theirs_iters"]}, "max_iters": iters,
            "rule": "the same number of Lloyd iterations on both sides (tol 0: each stops early only at a fixed point)",
            "seconds": {"ours": t_o, "theirs": t_t}, "time_ratio": t_o / t_t,
            "time_ratio_cpu_time": median(cpu["ours"]) / median(cpu["theirs"]),
            "inertia": {"ours": i_o, "theirs": i_t}, "inertia_ratio": i_o / i_t,
            "raw_seconds": times, "raw_cpu_seconds": cpu}
