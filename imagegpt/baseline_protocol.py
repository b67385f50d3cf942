"""The baselines of the evaluation protocol: which images each role gets, what is chosen on dev, what is scored on test.

Three roles, never mixed (the project's split of its images, as prepare.prepare makes it):
- test: the held-out images, splits.split_roles(labels, cfg)[2] (the 1,000
  built-in digits docs/results.md reports on); read once, for the final scores, after every choice is made;
- train: the other images; prepare.prepare fits the codebook and the GPT on them (and on their augmented
  copies);
- dev: carved from train by splits.split_roles (split_seed + 1, fold 0), exactly as prepare.prepare does with
  dev_fraction; the rest of train is called fit here.

Each baseline is fitted on fit and scored on dev for every candidate setting; the best dev accuracy
picks the setting (ties go to the earlier candidate: fewer neighbours, cosine before L2, stronger L2
weight). The chosen setting is then refitted on all of train (fit + dev, as the GPT is trained) and
scored on test once. Augmented copies are made as prepare.prepare makes them: augment.augment(images,
augment, cfg, seed=split_seed), the same fixed copies the GPT's training files hold.
The seed-dependent baselines (the codebook's k-means start, the CNN's initial weights and batch
order) run once per seed; the others are deterministic and run once.
"""
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imagegpt import classifiers as clf
from imagegpt.augment import MOVE_LIMITS, augment, tta_views
from imagegpt.errors import UserError
from imagegpt.settings import changed, flat
from imagegpt.splits import split_roles
from imagegpt.stats import seed_summary, wilson_interval
import tokenizer
from tokenizer import psnr
from tokenizer import uint8_to_tensor as to_tensor


def project_split(labels, cfg, dev_fraction):
    """The three roles as index arrays {train, fit, dev, test}: the split of prepare.prepare (splits.split_roles)
    with this dev_fraction; train is fit and dev together."""
    fit, dev, test = split_roles(labels, changed(cfg, dev_fraction=dev_fraction))
    return {"train": np.sort(np.concatenate([fit, dev])), "fit": fit, "dev": dev, "test": test}


def augmented(x, cfg):
    """x plus the fixed augmented copies prepare.prepare adds to a training set."""
    if cfg.augment == 0:
        return x
    return torch.cat([x, augment(x, cfg.augment, cfg, cfg.split_seed)])


def fit_codebook(x, cfg, seed):
    return tokenizer.fit_codebook(x, replace(cfg.codebook, codebook_seed=seed))


def reconstruct(book, x):
    return book.decode(book.encode(x))


@dataclass
class SuiteConfig:
    dev_fraction: float = 0.2
    seeds: int = 3                      # runs of the seed-dependent baselines
    first_seed: int = 0                 # seeds first_seed .. first_seed + seeds - 1
    knn_k: tuple = (1, 3, 5, 7, 9)      # k-NN candidates: every k with every metric
    knn_metrics: tuple = clf.METRICS
    logreg_l2: tuple = (1e-1, 1e-2, 1e-3, 1e-4)   # strongest first
    cnn: clf.CNNTraining = field(default_factory=clf.CNNTraining)
    tta: int = 16                       # test-time views of the CNN's second row (the GPT's eval.py --tta 16)


def quick(suite, cfg):
    """A fast run for smoke tests -> (suite, data config): a short CNN schedule, fewer candidates, a
    k-means on fewer vectors with fewer steps."""
    return (replace(suite, knn_k=(1, 3), logreg_l2=(1e-2, 1e-3), cnn=replace(suite.cnn, epochs=min(suite.cnn.epochs, 2), warmup_steps=10)),
            changed(cfg, kmeans_iters=min(cfg.codebook.kmeans_iters, 5), fit_samples=min(cfg.codebook.fit_samples, 20000)))


def accuracy(pred, labels):
    return (pred == labels).double().mean().item()


def select(candidates, dev_accuracy):
    """Score every candidate on dev -> (the best {params, dev_accuracy}, all of them); ties go to the
    earlier candidate."""
    table = [{"params": c, "dev_accuracy": dev_accuracy(c)} for c in candidates]
    return table[max(range(len(table)), key=lambda i: (table[i]["dev_accuracy"], -i))], table


def knn_select(ref, ref_labels, query, query_labels, suite, num_classes):
    """Choose (k, metric) for a k-NN on ref by accuracy on query (the dev images)."""
    kmax = min(max(suite.knn_k), len(ref))
    neighbours = {m: clf.knn_neighbours(clf.flat(ref), clf.flat(query), kmax, m) for m in suite.knn_metrics}
    cands = [{"k": k, "metric": m} for k in suite.knn_k if k <= kmax for m in suite.knn_metrics]
    return select(cands, lambda c: accuracy(
        clf.knn_vote(ref_labels, neighbours[c["metric"]], c["k"], num_classes), query_labels))


def check_suite(suite):
    if not 0 < suite.dev_fraction < 1:
        raise UserError(f"--dev_fraction must be between 0 and 1, got {suite.dev_fraction}")
    if suite.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {suite.seeds}")
    if suite.cnn.epochs < 1 or suite.cnn.batch_size < 1:
        raise UserError(f"--epochs and --batch_size must be at least 1, got {suite.cnn.epochs} and "
                        f"{suite.cnn.batch_size}")
    if suite.tta < 1:
        raise UserError(f"--tta must be at least 1, got {suite.tta}")
    if not suite.cnn.lr > 0 or suite.cnn.weight_decay < 0:
        raise UserError(f"--lr must be > 0 and --weight_decay >= 0, got {suite.cnn.lr} and {suite.cnn.weight_decay}")


def run_baselines(images, labels, class_names, cfg, suite=SuiteConfig(), save_judge=None, roles=None):
    """Run every baseline under the protocol (module docstring) on images uint8 (N, H, W, C), labels (N,)
    as sources.load_source returns them; roles: the split (default project_split; tests pass their own).
    Returns (report: a JSON-ready dict, predictions: {baseline: [test predictions (n_test,) per run]})."""
    t_start = time.time()
    check_suite(suite)
    run = SuiteRun(images, labels, class_names, cfg, suite, roles or project_split(labels, cfg, suite.dev_fraction))
    run.pixel_knn()
    run.logistic_regression()
    seeded = [run.seeded(s, save_judge if s == run.seeds[0] else None) for s in run.seeds]
    run.bar.close()
    recon_runs, cnn_runs, tta_runs, judge_runs, models = zip(*seeded)
    n_params = sum(p.numel() for p in models[-1].parameters())
    run.record("knn_reconstructions", "k-NN on codebook reconstructions (the codebook fitted on the training images "
               "and their augmented copies, like data.py prepare, codebook_seed = the seed): what the tokens keep",
               recon_runs, True)
    run.record("cnn", f"LeNet-5-like CNN ({n_params:,} parameters) trained on the training images and their "
               f"{cfg.augment} augmented copies each (the GPT's training set); fixed recipe", cnn_runs, True)
    run.record("cnn_tta", f"the same CNNs, each image classified as the mean log-probability over it and {suite.tta} "
               "shifted / rotated views (augment.tta_views, as eval.py --tta scores the GPT)", tta_runs, True)
    run.record("cnn_on_reconstructions", "the same CNN applied to codebook reconstructions of the images (the "
               "ceiling of a judge of decoded tokens; nothing of its own is chosen)", judge_runs, True)
    report = {
        "protocol": __doc__.split("\n", 1)[1].strip(),
        "data": {k: v for k, v in flat(cfg).items() if k not in ("data_dir", "dev_fraction", "codebook_seed")},
        "suite": asdict(suite),
        "seeds": run.seeds,
        "class_names": list(class_names),
        "counts": {r: len(i) for r, i in run.roles.items()},
        "test_per_class": np.bincount(labels[run.roles["test"]], minlength=run.num_classes).tolist(),
        "torch_threads": torch.get_num_threads(),
        "baselines": run.results,
        "seconds_total": round(time.time() - t_start, 1),
    }
    return report, run.predictions


class SuiteRun:
    """One run of the suite: the images of each role (X, Y), the progress bar, and what each baseline
    scored (results) and predicted on the test images (predictions)."""

    def __init__(self, images, labels, class_names, cfg, suite, roles):
        self.cfg, self.suite, self.roles, self.class_names = cfg, suite, roles, class_names
        self.num_classes = len(class_names)
        for role, idx in roles.items():
            missing = sorted(set(range(self.num_classes)) - set(labels[idx].tolist()))
            if missing:
                raise UserError(f"{cfg.source}: {len(labels)} images are too few for the protocol's split: the "
                                f"{role} images have no {', '.join(class_names[c] for c in missing)}")
        x, y = to_tensor(images), torch.from_numpy(np.asarray(labels)).long()
        self.X = {r: x[i] for r, i in roles.items()}
        self.Y = {r: y[i] for r, i in roles.items()}
        self.cnn_cfg = clf.CNNConfig(channels=x.shape[1], image_size=x.shape[2], num_classes=self.num_classes)
        clf.LeNet(self.cnn_cfg)  # too small an image: one line now, not after the other baselines
        self.seeds = list(range(suite.first_seed, suite.first_seed + suite.seeds))
        self.results, self.predictions = {}, {}
        self.bar = tqdm(total=3 + len(suite.logreg_l2) + 6 * len(self.seeds), desc="baselines", unit="step")
        self.aug_fit, self.aug_train = augmented(self.X["fit"], cfg), augmented(self.X["train"], cfg)
        self.rep = cfg.augment + 1

    def stage(self, name):
        self.bar.set_postfix_str(name)

    def record(self, name, description, runs, seeded):
        """runs: one dict per run (seed) with params, dev_accuracy, test predictions, seconds."""
        Y = self.Y
        test_acc = [accuracy(r["pred"], Y["test"]) for r in runs]
        correct = [int((r["pred"] == Y["test"]).sum()) for r in runs]
        self.predictions[name] = [r.pop("pred") for r in runs]
        self.results[name] = {
            "description": description,
            "seeded": seeded,
            "runs": [dict(r, test_accuracy=a, test_correct=c, test_wilson95=wilson_interval(c, len(Y["test"])))
                     for r, a, c in zip(runs, test_acc, correct)],
            "test_accuracy": seed_summary(test_acc),
            "dev_accuracy": seed_summary([r["dev_accuracy"] for r in runs]),
            "seconds": round(sum(r["seconds"] for r in runs), 2),
        }

    @staticmethod
    def selected(best, table, pred, t, **extra):
        return dict(extra, params=best["params"], dev_accuracy=best["dev_accuracy"], dev_table=table, pred=pred,
                    seconds=round(time.time() - t, 2))

    def pixel_knn(self):
        """k-NN on raw pixels, with and without the augmented copies in the reference set."""
        X, Y, suite, C = self.X, self.Y, self.suite, self.num_classes
        t = time.time()
        self.stage("k-NN on pixels")
        best, table = knn_select(X["fit"], Y["fit"], X["dev"], Y["dev"], suite, C)
        pred = clf.knn_predict(X["train"], Y["train"], X["test"], best["params"]["k"], best["params"]["metric"], C)
        self.bar.update()
        self.record("knn_pixels", "k-NN on raw pixels (the training images as the reference set)",
                    [self.selected(best, table, pred, t)], False)
        t = time.time()
        self.stage("k-NN on pixels + copies")
        best, table = knn_select(self.aug_fit, Y["fit"].repeat(self.rep), X["dev"], Y["dev"], suite, C)
        pred = clf.knn_predict(self.aug_train, Y["train"].repeat(self.rep), X["test"], best["params"]["k"],
                               best["params"]["metric"], C)
        self.bar.update()
        self.record("knn_pixels_augmented", f"k-NN on raw pixels, the training images and their {self.cfg.augment} "
                    f"augmented copies each as the reference set", [self.selected(best, table, pred, t)], False)

    def logistic_regression(self):
        """Multinomial logistic regression on raw pixels, its L2 weight chosen on dev."""
        X, Y, C = self.X, self.Y, self.num_classes
        t = time.time()

        def dev_accuracy(c):
            self.stage(f"logistic regression, L2 {c['l2']:g}")
            acc = accuracy(clf.fit_logreg(X["fit"], Y["fit"], C, c["l2"]).predict(X["dev"]), Y["dev"])
            self.bar.update()
            return acc

        best, table = select([{"l2": v} for v in self.suite.logreg_l2], dev_accuracy)
        self.stage("logistic regression, refit")
        pred = clf.fit_logreg(X["train"], Y["train"], C, best["params"]["l2"]).predict(X["test"])
        self.bar.update()
        self.record("logreg_pixels", "multinomial logistic regression on raw pixels (L-BFGS; the L2 weight on the "
                    "weights chosen on dev)", [self.selected(best, table, pred, t)], False)

    def seeded(self, s, save_judge=None):
        """The seed-dependent baselines of seed s: the codebook (k-NN on its reconstructions) and the CNN
        (plain, with test-time augmentation, and applied to the reconstructions) -> their four runs and
        the CNN (saved as the judge to save_judge, if given)."""
        X, Y, suite, C, cfg = self.X, self.Y, self.suite, self.num_classes, self.cfg
        t = time.time()
        self.stage(f"codebook (dev), seed {s}")
        book_dev = fit_codebook(self.aug_fit, cfg, s)
        best, table = knn_select(reconstruct(book_dev, X["fit"]), Y["fit"], reconstruct(book_dev, X["dev"]),
                                 Y["dev"], suite, C)
        self.bar.update()
        self.stage(f"codebook, seed {s}")
        book = fit_codebook(self.aug_train, cfg, s)
        recon_test = reconstruct(book, X["test"])
        pred = clf.knn_predict(reconstruct(book, X["train"]), Y["train"], recon_test, best["params"]["k"],
                               best["params"]["metric"], C)
        self.bar.update()
        recon_run = self.selected(best, table, pred, t, seed=s)

        t = time.time()
        self.stage(f"CNN (dev), seed {s}")
        model_dev = train_cnn_bar(self.aug_fit, Y["fit"].repeat(self.rep), self.cnn_cfg, suite.cnn, s,
                                  f"CNN (dev), seed {s}")
        dev_acc = accuracy(clf.cnn_predict(model_dev, X["dev"]), Y["dev"])
        self.bar.update()
        self.stage(f"CNN, seed {s}")
        model = train_cnn_bar(self.aug_train, Y["train"].repeat(self.rep), self.cnn_cfg, suite.cnn, s, f"CNN, seed {s}")
        pred = clf.cnn_predict(model, X["test"])
        self.bar.update()
        cnn_run = {"seed": s, "params": asdict(suite.cnn), "dev_accuracy": dev_acc, "pred": pred,
                   "seconds": round(time.time() - t, 2)}
        t = time.time()
        self.stage(f"CNN with test-time augmentation, seed {s}")
        tta_run = {"seed": s, "params": {"views": suite.tta},
                   "dev_accuracy": accuracy(cnn_tta_predict(model_dev, X["dev"], cfg, suite.tta), Y["dev"]),
                   "pred": cnn_tta_predict(model, X["test"], cfg, suite.tta), "seconds": round(time.time() - t, 2)}
        self.bar.update()
        t = time.time()
        self.stage(f"CNN on reconstructions, seed {s}")
        judge_pred = clf.cnn_predict(model, recon_test)
        judge_run = {"seed": s, "params": {}, "pred": judge_pred, "seconds": round(time.time() - t, 2),
                     "dev_accuracy": accuracy(clf.cnn_predict(model_dev, reconstruct(book_dev, X["dev"])), Y["dev"])}
        self.bar.update()
        if save_judge:
            clf.save_cnn(model, save_judge, self.class_names, info={
                "trained_on": f"the {len(X['train'])} training images of {cfg.source} and {cfg.augment} augmented "
                              f"copies of each (split_seed {cfg.split_seed}, test_fraction {cfg.test_fraction}, "
                              f"{', '.join(f'{k} {getattr(cfg, k)}' for k in MOVE_LIMITS)})",
                "training": asdict(suite.cnn), "seed": s,
                "test_accuracy": accuracy(pred, Y["test"]),
                "test_accuracy_on_codebook_reconstructions": accuracy(judge_pred, Y["test"]),
                "codebook": f"fitted like data.py prepare on the same images, codebook_seed {s}"})
        return recon_run, cnn_run, tta_run, judge_run, model


def cnn_tta_predict(model, x, cfg, views):
    """The CNN's predictions for float images x with test-time augmentation (augment.tta_views)."""
    logp = sum(F.log_softmax(clf.cnn_logits(model, v).double(), -1)
               for v in tta_views(x, views, cfg))
    return logp.argmax(1)


def train_cnn_bar(x, y, cnn_cfg, training, seed, desc):
    bar = tqdm(total=training.epochs * len(x), desc=desc, unit="img", unit_scale=True, leave=False)
    model = clf.train_cnn(x, y, cnn_cfg, training, seed, progress=bar.update)
    bar.close()
    return model


# ----------------------------------------------------------------------------- the results table

def _pct(v):
    return f"{100 * v:.1f} %"


def _params(runs):
    """The chosen setting of each run, counted (the codebook's may differ between seeds)."""
    shown = []
    for r in runs:
        p = r["params"]
        if "k" in p:
            shown.append(f"k = {p['k']}, {p['metric']}")
        elif "l2" in p:
            shown.append(f"L2 weight {p['l2']:g}")
        elif "views" in p:
            shown.append(f"{p['views']} views (fixed)")
        elif "epochs" in p:
            shown.append(f"{p['epochs']} epochs, batch {p['batch_size']}, AdamW lr {p['lr']:g}, weight decay "
                         f"{p['weight_decay']:g} (fixed)")
        else:
            shown.append("none")
    counts = Counter(shown)
    if len(counts) == 1:
        return shown[0]
    return "; ".join(f"{k} ({n} of {len(runs)} seeds)" for k, n in counts.items())


NAMES = {
    "knn_pixels": "k-NN on raw pixels",
    "knn_pixels_augmented": "k-NN on raw pixels, augmented copies in the reference set",
    "logreg_pixels": "logistic regression on raw pixels",
    "knn_reconstructions": "k-NN on codebook reconstructions",
    "cnn": "LeNet-5-like CNN, same augmented copies",
    "cnn_tta": "the same CNN with test-time augmentation",
    "cnn_on_reconstructions": "the same CNN on codebook reconstructions",
}


def markdown_table(report):
    """The results table (docs/results.md): one row per baseline, test accuracy as mean +- std over seeds where seeded."""
    n_test = report["counts"]["test"]
    lines = ["| baseline | setting (chosen on dev) | dev accuracy | test accuracy | 95 % CI of the mean over seeds (t) | time |",
             "|---|---|---:|---:|---|---:|"]
    for name, res in report["baselines"].items():
        te, dev = res["test_accuracy"], res["dev_accuracy"]
        if te["n"] > 1:
            test = f"{100 * te['mean']:.2f} +- {100 * te['std']:.2f} %"
            lo, hi = max(0.0, te["ci95"][0]), min(1.0, te["ci95"][1])   # (an accuracy stays in [0, 1])
            ci = f"{100 * lo:.2f} to {100 * hi:.2f} % ({te['n']} seeds)"
            devs = f"{100 * dev['mean']:.2f} %"
        else:
            test = f"{100 * te['mean']:.2f} %"
            ci = "deterministic" if not res["seeded"] else "(1 seed)"
            devs = f"{100 * dev['mean']:.2f} %"
        lines.append(f"| {NAMES.get(name, name)} | {_params(res['runs'])} | {devs} | {test} | {ci} | "
                     f"{res['seconds']:.0f} s |")
    c = report["counts"]
    lo, hi = wilson_interval(round(0.98 * n_test), n_test)
    lines.append("")
    lines.append(f"Images: {c['fit']} fit + {c['dev']} dev = {c['train']} training, {n_test} test. Dev accuracy: "
                 f"fitted on the {c['fit']}, scored on the {c['dev']}; test accuracy: refitted on all {c['train']} "
                 f"with the chosen setting. One run on {n_test} test images has a binomial 95 % interval of about "
                 f"+-{100 * (hi - lo) / 2:.1f} points at 98 % (Wilson; per run in the JSON).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the tokenisation table

TOKENISATIONS = [  # (row label, settings that differ from the base config)
    ("`patch_size: 1` (the original per-pixel scheme)", {"patch_size": 1}),
    ("`patch_size: 2`", {"patch_size": 2}),
    ("**`patch_size: 4` (default)**", {}),
    ("`patch_size: 7`", {"patch_size": 7}),
    ("4, colour only (`w_gradient: 0`)", {"w_gradient": 0.0}),
    ("4, with position (`w_position: 1`)", {"w_position": 1.0}),
    ("4, K = 1000", {"num_codes": 1000}),
]


def tokenisation_table(images, labels, cfg, dev_fraction, rows=TOKENISATIONS, progress=True):
    """What each tokenisation keeps, measured without the test split: the codebook is fitted on the
    training images minus the development split (as prepare.prepare fits it), and the development
    images are reconstructed. Per row: tokens per image, development PSNR, distinct sequences among
    all training and development images, code perplexity, 1-NN accuracy of the development
    reconstructions against the fitting images' reconstructions (L2; raw pixels beside it), seconds.
    images uint8 (N, H, W, C); the test images are never touched. -> list of dicts."""
    roles = project_split(labels, cfg, dev_fraction)
    seen = np.concatenate([roles["fit"], roles["dev"]])
    x = to_tensor(images[seen])
    fit, dev = x[:len(roles["fit"])], x[len(roles["fit"]):]
    y_fit, y_dev = torch.as_tensor(labels[roles["fit"]]), torch.as_tensor(labels[roles["dev"]])
    C = int(labels.max()) + 1
    raw = accuracy(clf.knn_predict(fit, y_fit, dev, 1, "l2", C), y_dev)
    out = []
    for label, change in tqdm(rows, desc="tokenisations", disable=not progress):
        c = changed(cfg, **change)
        if c.image_size % c.codebook.patch_size:
            raise UserError(f"{label}: image_size {c.image_size} is not divisible by patch_size {c.codebook.patch_size}")
        t0 = time.time()
        book = tokenizer.fit_codebook(fit, c.codebook)
        codes = book.encode(x)
        seconds = time.time() - t0
        recon = book.decode(codes)
        usage = torch.bincount(codes.flatten(), minlength=book.code_space).double()
        pr = usage[usage > 0] / usage.sum()
        out.append({"setting": label, "change": change, "tokens_per_image": book.seq_len + 5,
                    "dev_psnr_db": psnr(recon[len(fit):], dev),
                    "distinct_sequences": len({tuple(s) for s in codes.tolist()}),
                    "distinct_images": len({r.tobytes() for r in images[seen]}),
                    "code_perplexity": math.exp(-(pr * pr.log()).sum().item()),
                    "knn1_reconstructions": accuracy(clf.knn_predict(recon[:len(fit)], y_fit, recon[len(fit):], 1,
                                                                     "l2", C), y_dev),
                    "knn1_raw_pixels": raw, "seconds": seconds})
    return out


def tokenisation_markdown(rows):
    lines = ["| setting | tokens / image | dev PSNR | distinct sequences | code perplexity | 1-NN on reconstructions "
             "(raw pixels) | fit + encode |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['tokens_per_image']} | {r['dev_psnr_db']:.1f} dB | "
                     f"{r['distinct_sequences']} / {r['distinct_images']} | {r['code_perplexity']:.1f} | "
                     f"{_pct(r['knn1_reconstructions'])} ({_pct(r['knn1_raw_pixels'])}) | {r['seconds']:.0f} s |")
    return "\n".join(lines)
