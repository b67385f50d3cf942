"""Several runs of one configuration, one per seed (train.py --seeds N), each in out_dir/seed-<seed>, and
their summary (seeds.json: mean, standard deviation and 95 % interval of the development accuracy)."""
import os

from imagegpt.device import resolve_device
from imagegpt.files import read_json
from imagegpt.provenance import precision, write_result
from imagegpt.settings import changed
from imagegpt.stats import seed_summary
from imagegpt.training import train


def seed_configs(cfg, n):
    """n copies of cfg with the seeds cfg.seed, cfg.seed + 1, ..., each in its own out_dir/seed-<seed>
    (the same data folder: the split and the codebook do not depend on the training seed)."""
    return [changed(cfg, seed=cfg.seed + k, out_dir=os.path.join(cfg.out_dir, f"seed-{cfg.seed + k}"))
            for k in range(n)]


def train_seeds(cfg, n, resume=False, allow_changes=False, log=print):
    """Train the configuration with n seeds (seed_configs; with resume, a started run continues and a
    complete one is kept) and write out_dir/seeds.json: each run's development accuracy of final/,
    and their mean, standard deviation and 95 % interval. -> that summary. A run stopped by Ctrl-C
    stops the series there (the summary then has no interval; --resume goes on)."""
    runs = []
    for c in seed_configs(cfg, n):
        log(f"seed {c.seed}: {c.out_dir}")
        started = os.path.exists(os.path.join(c.out_dir, "final", "trainer_state.pt"))
        out = train(c, resume=resume and started, log=log, allow_changes=allow_changes)
        final = read_json(os.path.join(c.out_dir, "final", "metrics.json"), "metrics.json")
        runs.append({"seed": c.seed, "out_dir": c.out_dir, "final_dev_accuracy": final.get("accuracy"),
                     "interrupted": out["interrupted"]})
        if out["interrupted"]:
            log(f"the series stops at seed {c.seed}; continue it with --resume")
            break
    accs = [r["final_dev_accuracy"] for r in runs if not r["interrupted"] and isinstance(r["final_dev_accuracy"], float)]
    summary = {"runs": runs, "final_dev_accuracy": seed_summary(accs) if len(accs) == n else None}
    write_result(os.path.join(cfg.out_dir, "seeds.json"), summary, config=cfg, seeds=[r["seed"] for r in runs],
                 dtype=precision(cfg.bf16, resolve_device(cfg.device, "config: device")))
    return summary
