"""The record (issue 36): provenance in result files, reproduce.py's parts (resumed, forced, failing
without writing), and the README's and docs' tables generated from the result files: a figure edited by
hand, a missing file or a file without provenance fails."""
import json
import os
import re
import shutil
import sys

import pytest
from fixtures import ROOT

import eval as ev
import reproduce
from imagegpt import provenance, record, record_parts, tables
from imagegpt.errors import UserError
from imagegpt.files import write_json


# ----------------------------------------------------------------------------- provenance

def test_provenance_names_the_code_command_settings_seeds_and_machine():
    p = provenance.record(command="python x.py --a 1", config={"b": [1, 2], "a": 1}, seeds=[1337, 1338], dtype="fp32")
    assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]) and isinstance(p["dirty"], bool)
    assert p["command"] == "python x.py --a 1" and p["seeds"] == [1337, 1338] and p["dtype"] == "fp32"
    assert p["config_sha256"] == provenance.config_hash({"a": 1, "b": (1, 2)})    # key order and tuples: the same
    assert p["config_sha256"] != provenance.config_hash({"a": 2, "b": [1, 2]})
    m = p["machine"]
    assert m["cpu"] and set(m["cpu_flags"]) <= set(provenance.CPU_FLAGS) and 1 <= m["cores_available"] <= m["cpu_count"]
    assert m["torch_threads"] >= 1                        # torch is imported here
    assert p["versions"]["torch"] and p["versions"]["python"].count(".") == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["date"]) and p["started"] <= p["date"]
    assert p["wall_seconds"] >= 0


def test_only_changes_to_code_make_the_tree_dirty():
    status = "\0".join([" M imagegpt/model.py", "?? runs/demo/x.json", "?? data/mnist/", "?? node_modules",
                        " M docs/results.md", " M README.md", "R  new.py", "old.py", "?? tests/new_test.py", ""])
    assert provenance.changed_code(status) == ["imagegpt/model.py", "new.py", "tests/new_test.py"]
    assert provenance.changed_code("") == []


def test_a_result_file_keeps_its_keys_in_order_and_gets_provenance_last(tmp_path):
    result = {"b": 1, "a": [0.5, {"z": 1, "y": 2}]}
    plain, proven = tmp_path / "plain.json", tmp_path / "proven.json"
    write_json(plain, result)
    written = provenance.write_result(proven, result, command="python x.py", seeds=[1])
    assert list(json.loads(proven.read_text())) == ["b", "a", "provenance"] and written["provenance"]["seeds"] == [1]
    assert provenance.without_provenance(json.loads(proven.read_text())) == result
    assert json.dumps(provenance.without_provenance(json.loads(proven.read_text())), indent=2) + "\n" == plain.read_text()
    assert provenance.same_results(plain, proven) == (True, None)
    write_json(plain, {"b": 2, "a": result["a"]})
    same, where = provenance.same_results(plain, proven)
    assert not same and '"b": 2' in where and '"b": 1' in where
    assert reproduce.main(["--compare", str(plain), str(proven)]) == 1
    assert reproduce.main(["--compare", str(proven), str(proven)]) == 0


def test_hf_export_json_is_for_check():
    import hf_export
    with pytest.raises(UserError, match="--json only applies together with --check"):
        hf_export.main(["--json", "parity.json"])


def test_eval_json_ends_with_its_provenance_and_is_otherwise_unchanged(tiny, tmp_path):
    one, summary = tmp_path / "one.json", tmp_path / "summary.json"
    assert ev.main(["--ckpt", tiny.ckpt, "--bf16", "false", "--out", str(one)]) == 0
    d = json.loads(one.read_text())
    assert list(d)[:3] == ["checkpoint", "checkpoint_chosen", "data"] and list(d)[-2:] == ["confusion_png", "provenance"]
    p = d["provenance"]
    assert p["seeds"] == [1337] and p["dtype"] == "fp32" and p["config_sha256"]
    assert ev.main(["--ckpt", tiny.ckpt, tiny.ckpt, "--bf16", "false", "--out", str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert list(s)[-1] == "provenance" and s["provenance"]["seeds"] == [1337, 1337]
    assert s["per_checkpoint"][0]["accuracy"] == d["accuracy"]


# ----------------------------------------------------------------------------- generated tables

def page(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_the_generated_tables_are_what_their_result_files_give():
    assert tables.check() == []
    readme, results = page("README.md"), page("docs/results.md")
    assert "<!-- table:results -->" in readme and "<!-- table:results_summary -->" in results
    best = json.loads(page(os.path.join("docs", "results", "best_refit_test_tta16_seeds1337-1339.json")))
    assert f"**{100 * best['tta_accuracy']['mean']:.2f} +- " in tables.render("table", "results", tables.Results())


@pytest.mark.parametrize("name, marker", [
    ("README.md", "table:results"), ("README.md", "figure:first_command"), ("docs/results.md", "table:results_summary"),
])
def test_a_figure_edited_by_hand_fails(name, marker):
    """The first percentage in a generated block, its last digit changed by hand (whatever the record's figures)."""
    text = page(name)
    block = next(m for m in tables.MARKER.finditer(text) if f"<!-- {marker} -->" in m[0])
    old = re.search(r"\d+\.\d+ %", block[0])[0]
    new = old[:-3] + str((int(old[-3]) + 1) % 10) + " %"
    edited = text[:block.start()] + block[0].replace(old, new, 1) + text[block.end():]
    problems = tables.check_text(edited, tables.Results(), name)
    assert len(problems) == 1 and "differs from its result files" in problems[0] and new.strip("| ") in problems[0]
    assert tables.rewrite_text(edited, tables.Results(strict=False)) == text      # --tables puts it back


def test_a_missing_file_or_one_without_provenance_fails(tmp_path):
    readme, name = page("README.md"), "best_refit_test_tta16_seeds1337-1339.json"
    folder = tmp_path / "results"
    shutil.copytree(tables.RESULTS, folder)
    strict = lambda: tables.Results(str(folder), True)
    assert tables.check_text(readme, strict()) == []
    write_json(folder / name, provenance.without_provenance(json.loads((folder / name).read_text())))
    problems = tables.check_text(readme, strict())                  # without provenance: not shown
    assert problems and all(f"{name}: has no provenance" in p for p in problems)
    os.remove(folder / name)
    problems = tables.check_text(readme, strict())
    assert problems and all(f"{name}: no such result file" in p for p in problems)
    rewritten = tables.rewrite_text(readme, tables.Results(str(folder), False))
    assert rewritten.count(tables.NOT_RERUN) > readme.count(tables.NOT_RERUN) and tables.check_text(rewritten, strict())
    assert "98.80 +- 0.17" not in rewritten.split("<!-- /table:results -->")[0]


def test_the_tests_figure_comes_from_its_file(tmp_path):
    write_json(tmp_path / "tests.json", provenance.with_provenance({"tests": 742, "pytest_seconds": 275.4,
                                                                   "wall_seconds": 280.0}, command="x"))
    text = "the suite: <!-- figure:tests -->1 test in 0 min 1 s<!-- /figure:tests -->, on 2 cores"
    r = tables.Results(str(tmp_path))
    assert tables.rewrite_text(text, r) == "the suite: <!-- figure:tests -->742 tests in 4 min 35 s<!-- /figure:tests -->, on 2 cores"
    assert "figure:tests: differs" in tables.check_text(text, r)[0]
    assert "no such generated" in tables.check_text("<!-- table:nope -->x<!-- /table:nope -->", r)[0]


def test_the_record_runs_table_reads_each_parts_last_run_from_its_files(tmp_path):
    stamp = {"part": "bench", "quick": False, "finished": "2026-12-07T04:51:29+00:00", "part_seconds": 262.5}
    prov = provenance.with_provenance({"x": 1}, command="python bench.py")
    prov[provenance.KEY]["record"] = stamp
    write_json(tmp_path / "bench_cpu.json", prov)
    quick = json.loads(json.dumps(prov))
    quick[provenance.KEY]["record"] = {**stamp, "part": "loadtest", "quick": True}
    write_json(tmp_path / "loadtest.json", quick)                      # a quick run is not the record's
    write_json(tmp_path / "scale.json", {"x": 1})                      # no provenance
    text = tables.render("table", "record_runs", tables.Results(str(tmp_path), strict=True))
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    assert len(rows) == len(record_parts.PARTS)
    assert "2026-12-07 04:51 UTC | 4 min 22 s | `" + prov[provenance.KEY]["commit"][:7] + "`" in rows["bench"]
    assert all("not rerun yet" in rows[name] for name in ("loadtest", "scale", "demo"))
    assert f"1 of {len(record_parts.PARTS)} parts run" in text and "4 min 22 s of wall time in all" in text


# ----------------------------------------------------------------------------- the record's runner

WRITE = ("-c", "import sys; from imagegpt.provenance import write_result; "
               "write_result(sys.argv[1], {'value': float(sys.argv[2])}, command='python fake', seeds=[1])")


@pytest.fixture
def fake_parts(monkeypatch):
    """Two small parts: `first` writes first.json (and keeps a file), `second` reads what first keeps."""
    settings = {"value": "1", "fail": False}

    def first(ctx):
        fail = (("-c", "import sys; print('broken on purpose'); sys.exit(3)"),) if settings["fail"] else ()
        return [Step("keep", ("-c", f"import os; os.makedirs({ctx.path('kept')!r}); open({ctx.path('kept', 'k')!r}, 'w')")),
                Step("write", (*WRITE, ctx.out("first.json"), settings["value"])), *(Step("fail", a) for a in fail)]

    def second(ctx):
        return [Step("read", ("-c", f"open({ctx.of('first', 'kept', 'k')!r})")),
                Step("write", (*WRITE, ctx.out("second.json"), "2"))]

    Step = record_parts.Step
    parts = [record_parts.Part("first", "nothing", 0.1, ("first.json",), first, (), keeps=("kept",)),
             record_parts.Part("second", "nothing", 0.1, ("second.json",), second, (), needs=("first",))]
    monkeypatch.setattr(record, "PARTS", parts)
    monkeypatch.setattr(record, "BY_NAME", {p.name: p for p in parts})
    return settings


def test_parts_resume_rerun_when_their_settings_change_and_force(fake_parts, tmp_path):
    work, logs = str(tmp_path / "work"), []
    run = lambda *names, **kw: record.run(names, quick=True, log=logs.append, work=work, **kw)
    assert run("first") == {"first": "ran"}
    out = json.load(open(os.path.join(work, "results", "first.json")))
    stamp = out["provenance"]["record"]
    assert out["value"] == 1.0 and stamp["part"] == "first" and stamp["quick"] and stamp["part_seconds"] > 0
    assert run("first") == {"first": "skipped"}
    assert run("first", force=True) == {"first": "ran"}
    fake_parts["value"] = "5"                                  # other settings: the part is stale
    assert run() == {"first": "ran", "second": "ran"}
    assert json.load(open(os.path.join(work, "results", "first.json")))["value"] == 5.0
    assert run() == {"first": "skipped", "second": "skipped"}
    shutil.rmtree(os.path.join(work, "first", "kept"))        # what `second` reads is gone: `first` runs again
    assert run("second") == {"first": "ran", "second": "ran"}
    assert run("first", "second", force=True)["second"] == "ran"
    rows = {r[0]: r for r in record.listing(quick=True, work=work)}
    assert rows["first"][2] == "last run" and rows["first"][3] == "up to date"


def test_a_failing_step_is_one_line_and_leaves_the_results_as_they_were(fake_parts, tmp_path):
    work = str(tmp_path / "work")
    record.run(["first"], quick=True, log=lambda *a: None, work=work)
    path = os.path.join(work, "results", "first.json")
    before = open(path).read()
    fake_parts.update(value="7", fail=True)
    with pytest.raises(UserError, match=r"part first: .*\(fail\) failed \(exit 3\): broken on purpose; the log: "):
        record.run(["first"], quick=True, log=lambda *a: None, work=work)
    assert open(path).read() == before                          # the new value was staged, never moved in


def test_the_quick_tests_part_records_the_count_and_time(tmp_path):
    done = record.run(["tests"], quick=True, log=lambda *a: None, work=str(tmp_path / "work"))
    assert done == {"tests": "ran"}
    t = json.load(open(tmp_path / "work" / "results" / "tests.json"))
    assert t["tests"] == t["counts"]["passed"] == 1 and t["pytest_seconds"] > 0 and t["wall_seconds"] > 0
    assert t["provenance"]["command"].startswith("python -m pytest") and t["provenance"]["record"]["part"] == "tests"


def test_every_part_names_its_results_and_its_code():
    names = [p.name for p in record.PARTS]
    assert len(names) == len(set(names)) and all(n in record.BY_NAME for p in record.PARTS for n in p.needs)
    files = [r for p in record.PARTS for r in p.results]
    assert len(files) == len(set(files))                        # one part owns each result file
    read = tables.Results()
    for path in tables.documents():                              # every file a table reads is made by a part
        assert tables.check_text(open(path, encoding="utf-8").read(), read) == []
    assert read.cache and set(read.cache) <= set(files)
    demo = record.code_files(record.BY_NAME["demo"])
    assert {"train.py", "eval.py", "model.py", "tokenizer.py", "imagegpt/training.py", "config/demo.yaml",
            "requirements.txt"} <= set(demo) and "bench.py" not in demo
    for p in record.PARTS:                                       # the steps of both versions can be listed
        for quick in (False, True) if p.quick else (False,):
            steps = p.steps(record.Context(p, quick))
            assert steps and all(s.argv or s.call for s in steps)
            assert all(os.path.exists(os.path.join(ROOT, s.argv[0])) for s in steps if s.argv and s.argv[0] != "-c")


def test_reproduce_lists_the_parts_and_refuses_bad_requests(capsys):
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{p.name} ", out, re.M) for p in record.PARTS) and "parts," in out
    for argv, message in [(["nope"], "nope: no such part"), (["--force"], "--force needs the names"),
                          (["--quick", "fresh_clone"], "fresh_clone: has no quick version"),
                          (["--list", "demo"], "--list runs nothing"), (["--quick", "--tables"], "--tables writes")]:
        with pytest.raises(UserError, match=message):
            reproduce.main(argv)


def test_reproduce_has_no_traceback_for_a_bad_flag():
    import subprocess
    done = subprocess.run([sys.executable, "reproduce.py", "--nope"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--nope" in done.stderr
