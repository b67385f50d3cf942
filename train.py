"""Train the GPT on token sequences as a causal language model (the label is the last real token).

    python train.py config/demo.yaml [--key value ...] [--resume]
    python train.py config/demo.yaml --seeds 3               # seeds 1337, 1338, 1339 in runs/demo/seed-*
    torchrun --nproc_per_node=2 train.py config/v2.yaml       # DDP (NCCL on CUDA, gloo on CPU)

Every setting (the options below: imagegpt/train_config.py's TrainConfig, composed of the data settings of
imagegpt/data_config.py, the codebook's of imagegpt/codebook_config.py and the model's of model.py)
can be set in the YAML file or overridden with --key value. If the sequence files are missing they
are prepared first. Training evaluates on the development split (dev.jsonl, made with dev_fraction > 0)
and never reads the test split (test.jsonl). The run folder (out_dir) gets log.jsonl (one JSON line per
evaluation), best/ (best development accuracy; only with a development split), final/ (the end of the
schedule, resumable with --resume) and curves.png. Ctrl-C saves final/ and exits 0.

One run at a time per out_dir (a second one is refused, naming the first one's pid). --resume continues
with the settings the run was started with: other model or data settings are refused, other training
settings (lr, epochs, ...) too unless --allow_changes. max_length (the block size) is by default the
data's sequence length; one that would cut the images is refused unless allow_truncation is true. A loss
or weights that are not finite stop the run (exit 2), keeping the last good checkpoint.

With --seeds N the same run is repeated with N seeds, each in its own folder, and the development
accuracies are summarised (mean, standard deviation, 95 % interval) in out_dir/seeds.json;
`python eval.py --ckpt runs/demo/seed-*/final` then reports the test split.
"""
import sys

from imagegpt.cli import parser, run_cli
from imagegpt.errors import UserError
from imagegpt.seed_runs import train_seeds
from imagegpt.settings import add_options
from imagegpt.train_config import TrainConfig, load_config
from imagegpt.training import train


def build_parser():
    ap = parser(__doc__, prog="train.py")
    ap.add_argument("config", nargs="?", help="YAML file of settings (a flat key: value mapping)")
    ap.add_argument("--resume", action="store_true", help="continue out_dir/final exactly where it stopped")
    ap.add_argument("--seeds", type=int, default=1, help="train N runs with the seeds seed, seed+1, ... in "
                    "out_dir/seed-<seed> and summarise them (default: %(default)s)")
    ap.add_argument("--allow_changes", action="store_true",
                    help="with --resume: go on with training settings (lr, epochs, ...) other than the run's")
    add_options(ap, TrainConfig)
    return ap


def main(argv=None):
    ap = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if not argv:  # nothing to train on without a config or settings: say how
        ap.print_help()
        return 0
    args = ap.parse_args(argv)
    if args.allow_changes and not args.resume:
        raise UserError("--allow_changes is for --resume (it allows other training settings than the run's)")
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "resume", "allow_changes", "seeds") and v is not None}
    cfg = load_config(args.config, overrides)
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    if args.seeds > 1:
        return report_seeds(cfg, args.seeds, args.resume, args.allow_changes)
    out = train(cfg, resume=args.resume, allow_changes=args.allow_changes)
    best = f"; best dev accuracy {out['best_accuracy']:.4f} in {cfg.out_dir}/best" \
        if out["best_accuracy"] is not None else ""
    print(f"done: {out['step']} steps in {out['seconds']:.0f} s{best}; final checkpoint {cfg.out_dir}/final")
    return 0


def report_seeds(cfg, n, resume, allow_changes):
    summary = train_seeds(cfg, n, resume, allow_changes, log=print)
    s = summary["final_dev_accuracy"]
    if s:
        spread = f" +- {100 * s['std']:.2f} (95 % interval {100 * s['ci95'][0]:.2f} .. {100 * s['ci95'][1]:.2f})"
        print(f"{n} seeds: development accuracy of final/ {100 * s['mean']:.2f} %{spread}")
    print(f"wrote {cfg.out_dir}/seeds.json; the test split: python eval.py --ckpt {cfg.out_dir}/seed-*/final")
    return 0


if __name__ == "__main__":
    run_cli(main)
