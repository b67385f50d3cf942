"""Rerun the record: the experiments behind every figure of the README's and the docs' tables, as named
parts, each writing its result files (with their provenance) into docs/results/; then the tables.

    python reproduce.py --list                 # the parts, what they back, their estimated time and state
    python reproduce.py                        # every part that is not up to date (hours on 2 CPU cores)
    python reproduce.py demo export            # these parts (and the parts they read from, if needed)
    python reproduce.py demo --force           # run it again even if it is up to date
    python reproduce.py --quick                # a small version of every part (tiny models and data), for
                                               # CI: results in runs/record-quick/results, docs untouched
    python reproduce.py --tables               # rewrite the README's and the docs' generated tables (only;
    python reproduce.py demo --tables          # with names: after running those parts)
    python reproduce.py --check                # do they match their result files? (exit 1 where not)
    python reproduce.py --compare A.json B.json  # the same results, provenance aside? (exit 1 where not)

A part runs its commands (train.py, eval.py, baselines.py, ... as subprocesses from the repository root)
in a fresh folder, runs/record/NAME (its log: runs/record/NAME/log.txt), and moves its result files into
docs/results/ only when every step has succeeded. Each result file carries its provenance (commit, command,
settings, seeds, machine, date and wall time) and the part's stamp: a hash of the code the part runs and
one of its settings. A part whose result files carry the current stamps is skipped, so a stopped run
resumes where it stopped; --force runs the named parts again. Progress: one bar per part against its
estimate (the last run's time, or the declared one). The models compute in fp32 on every CPU.
"""
from imagegpt import record, tables
from imagegpt.cli import parser, run_cli
from imagegpt.errors import UserError
from imagegpt.provenance import same_results


def build_parser():
    ap = parser(__doc__, prog="reproduce.py")
    ap.add_argument("parts", nargs="*", metavar="NAME", help="the parts to run (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="print the parts, the figures they back, their estimated "
                    "time and whether their result files are up to date, and run nothing")
    ap.add_argument("--quick", action="store_true", help="run a small version of each part (tiny models, few steps, "
                    "tiny data) into runs/record-quick/ instead of docs/results/")
    ap.add_argument("--force", action="store_true", help="run the named parts even where their result files are up "
                    "to date")
    ap.add_argument("--tables", action="store_true", help="rewrite the generated tables of the README and docs/ "
                    "(between <!-- table:NAME --> markers) from docs/results/; with part names, after running them")
    ap.add_argument("--check", action="store_true", help="check that every generated table and figure in the README "
                    "and docs/ is what its result files give (exit 1 where not); runs nothing")
    ap.add_argument("--compare", nargs=2, metavar="FILE", help="do two result files hold the same results, their "
                    "provenance aside? (exit 0 if so, 1 if not); runs nothing")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    alone = [f for f, on in (("--list", args.list), ("--check", args.check), ("--compare", args.compare)) if on]
    if len(alone) > 1 or (alone and (args.parts or args.force or args.tables)):
        raise UserError(f"{alone[0]} runs nothing: it does not combine with parts, --force, --tables or {alone[-1]}"
                        if len(alone) == 1 else f"{alone[0]} and {alone[1]}: choose one")
    if args.force and not args.parts:
        raise UserError("--force needs the names of the parts to run again (all of them: python reproduce.py --list)")
    if args.quick and args.tables:
        raise UserError("--tables writes the docs from docs/results/; --quick results never go there")
    if args.compare:
        same, where = same_results(*args.compare)
        print("the same results (provenance aside)" if same else f"different: {where}")
        return 0 if same else 1
    if args.check:
        problems = tables.check()
        for p in problems:
            print(p)
        print(f"{len(tables.documents())} pages checked: " + (f"{len(problems)} problem(s)" if problems else
                                                               "every generated table matches its result files"))
        return 1 if problems else 0
    if args.list:
        rows = record.listing(args.quick)
        w = max(len(r[0]) for r in rows) + 2
        for name, seconds, source, why, results, backs in rows:
            print(f"{name:<{w}}{record.human(seconds) + f' ({source})':<24}{why}\n{'':{w}}backs: {backs}\n"
                  f"{'':{w}}writes: {', '.join(results)}")
        todo = [r for r in rows if r[3] != "up to date"]
        print(f"{len(rows)} parts, {len(todo)} to run: about {record.human(sum(r[1] for r in todo))} "
              f"(all of them: {record.human(sum(r[1] for r in rows))})")
        return 0
    if args.parts or not args.tables:
        done = record.run(args.parts, quick=args.quick, force=args.force)
        ran = [n for n, d in done.items() if d == "ran"]
        print(f"{len(ran)} part(s) ran" + (f" ({', '.join(ran)})" if ran else "") +
              f", {len(done) - len(ran)} up to date")
    if args.tables:
        changed = tables.rewrite()
        print(f"rewrote {', '.join(changed)}" if changed else "the generated tables were already up to date")
    return 0


if __name__ == "__main__":
    run_cli(main)
