"""The `datadream` command: help everywhere, one-line user errors with exit 2, the demo end to end."""

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest

from datadream.cli import build_parser, main

COMMANDS = ["demo", "demo-dataset", "fewshot", "adapt", "generate", "classify", "evaluate", "pipeline", "registry",
            "tune"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: datadream" in out
    if command not in (None, "demo-dataset", "pipeline", "registry", "tune"):
        assert "--set SECTION.KEY=VALUE" in out and "--preset" in out


def test_every_subcommand_is_tested_for_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, demo_dataset):
    (tmp_path / "empty").mkdir()
    assert main(["-q", "fewshot", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no class folders found" in _error_line(capsys)

    args = ["-q", "fewshot", "--dataset", str(demo_dataset), "--out", str(tmp_path / "o2")]
    assert main([*args, "--set", "fewshot.shotz=3"]) == 2
    assert "unknown config key 'fewshot.shotz'" in _error_line(capsys)
    assert main([*args, "--set", "adapt.rank=many"]) == 2
    assert "config key 'adapt.rank'" in _error_line(capsys)
    assert main([*args, "--shots", "100"]) == 2
    assert "fewer than shots=100" in _error_line(capsys)
    assert not (tmp_path / "o2").exists()
    assert main(["-q", "adapt", "--fewshot", str(tmp_path / "missing"), "--out", str(tmp_path / "a")]) == 2
    assert "classes.json" in _error_line(capsys)


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["adapt", "--mode", "pixel", "--fewshot", "x", "--out", "y"])
    assert e.value.code == 2


def test_console_script_entry_point(tmp_path):
    # The installed `python -m datadream.cli` behaves like main(): exit status 2 on bad input.
    r = subprocess.run([sys.executable, "-m", "datadream.cli", "-q", "fewshot", "--dataset", str(tmp_path / "no"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "folder not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_stage_commands_chain(tmp_path, capsys, demo_dataset):
    fast = ["--preset", "tiny", "--set", "adapt.max_steps=2", "--set", "generate.images_per_class=2",
            "--set", "generate.steps=2", "--set", "classify.epochs=1"]
    fs, ad, gen, clf, ev = (str(tmp_path / n) for n in ("fs", "ad", "gen", "clf", "ev"))
    assert main(["-q", "fewshot", "--dataset", str(demo_dataset), "--shots", "2", "--out", fs, *fast]) == 0
    assert main(["-q", "adapt", "--fewshot", fs, "--mode", "dataset", "--out", ad, *fast]) == 0
    assert main(["-q", "generate", "--fewshot", fs, "--adapters", ad, "--out", gen, *fast]) == 0
    assert main(["-q", "classify", "--fewshot", fs, "--synthetic", gen, "--train-on", "synthetic+real",
                 "--out", clf, *fast]) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", "--fewshot", fs, "--classifier", clf, "--out", ev, *fast]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert printed == {k: stored[k] for k in ("top1", "top5", "n")} and stored["n"] == 6 * 16


SETTINGS = ["zero-shot", "real only", "synthetic (class-wise)", "synthetic+real (class-wise)",
            "synthetic (dataset-wise)", "synthetic+real (dataset-wise)"]
FAST_DEMO = ["--set", "adapt.epochs=2", "--set", "generate.images_per_class=4", "--set", "generate.steps=2",
             "--set", "classify.epochs=3"]


def _check_table(out: Path, table: str) -> dict:
    for s in SETTINGS:
        assert s in table
    results = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in results["rows"]] == SETTINGS
    for r in results["rows"]:
        metrics = json.loads(Path(r["metrics"]).read_text())
        assert metrics["top1"] == r["top1"] and 0 <= r["top1"] <= r["top5"] <= 1
        assert (Path(r["classifier"]) / "classifier.json").is_file()
    return results


@pytest.mark.slow
def test_demo_runs_the_pipeline_locally_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *FAST_DEMO]) == 0
    printed = capsys.readouterr()
    results = _check_table(out, printed.out)
    assert results["engine"].startswith("kfp.local") and len(results["runs"]) == 2
    # A line per task as it finishes, counting up to the run's total; the tasks' own output is in their logs.
    assert "executor_input" not in printed.err and "%|" not in printed.err
    for mode in ("class-wise", "dataset-wise"):
        lines = [line for line in printed.err.splitlines() if line.startswith(f"✓ {mode}  ")]
        done, total = lines[-1].rsplit("[", 1)[1].rstrip("]").split("/")
        assert done == total == str(len(lines)) and len(lines) >= 8, lines
        assert "fewshot: " in (out / "logs" / mode / "fewshot.log").read_text()
    assert len(printed.err.splitlines()) <= 30, printed.err
    assert "where to look next:" in printed.out and "mlflow ui --backend-store-uri sqlite:///" in printed.out
    assert len(results["reports"]) == 2 and all("<table" in Path(r).read_text() for r in results["reports"])
    # The --set overrides reached the pipeline's steps through its config parameter.
    syn = next(Path(results["runs"][0]).glob("gather*/synthetic/generate.json"))
    assert json.loads(syn.read_text())["images_per_class"] == 4
    # The second run is dataset-wise: one adapter for all six classes.
    index = json.loads(next(Path(results["runs"][1]).glob("adapt*/adapters/adapter.json")).read_text())
    assert index["mode"] == "dataset" and set(index["classes"].values()) == {"dataset"} and len(index["classes"]) == 6


@pytest.mark.slow
def test_demo_in_process_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--in-process", "--out", str(out), *FAST_DEMO]) == 0
    _check_table(out, capsys.readouterr().out)
    for folder in ("fewshot/fewshot.json", "adapters-class/adapter.json", "adapters-dataset/adapter.json",
                   "synthetic-class/generate.json", "synthetic-dataset/generate.json"):
        assert (out / folder).is_file()
    report = (out / "report.html").read_text()  # every setting side by side, zero-shot named as such
    assert all(html.escape(s) in report for s in SETTINGS) and "<td>nothing (zero-shot)</td>" in report
    # A second run finds every stage finished and redoes nothing.
    stamp = (out / "adapters-class" / "adapter.json").stat().st_mtime_ns
    assert main(["-q", "demo", "--in-process", "--out", str(out), *FAST_DEMO]) == 0
    assert (out / "adapters-class" / "adapter.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("action", ["compile", "run", "upload", "submit", "schedule"])
def test_pipeline_actions_have_help(action, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pipeline", action, "--help"])
    assert e.value.code == 0 and f"usage: datadream pipeline {action}" in capsys.readouterr().out


def test_global_flags_before_or_after_the_subcommand():
    parser = build_parser()
    base = ["--dataset", "d", "--out", "o"]
    assert parser.parse_args(["fewshot", *base]).quiet is False
    assert parser.parse_args(["-q", "fewshot", *base]).quiet is True
    assert parser.parse_args(["fewshot", "-q", *base]).quiet is True
    assert parser.parse_args(["fewshot", *base, "--verbose"]).verbose is True
    assert parser.parse_args(["-v", "fewshot", *base]).verbose is True
    # nested actions too
    assert parser.parse_args(["registry", "list", "NAME", "-q"]).quiet is True
    assert parser.parse_args(["pipeline", "run", "--local", "-v"]).verbose is True


def test_stage_help_has_description_example_and_marker(capsys):
    from datadream.stages import adapt, classify, evaluate, fewshot, generate

    markers = {"fewshot": fewshot.MARKER, "adapt": adapt.MARKER, "generate": generate.MARKER,
               "classify": classify.MARKER, "evaluate": evaluate.METRICS}
    for stage, marker in markers.items():
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        out = capsys.readouterr().out
        description = out.split("\n\n")[1]  # after the usage block
        assert not description.lstrip().startswith(("options:", "-")), out
        assert f"example:\n  datadream {stage} --" in out
        assert f"writes {marker} last" in out


def test_shots_must_be_positive_and_the_error_names_it(capsys):
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as e:
            main(["fewshot", "--dataset", "d", "--out", "o", "--shots", bad])
        assert e.value.code == 2
        assert "argument --shots: expected a positive integer" in capsys.readouterr().err


def test_building_the_parser_imports_no_heavy_library():
    # What makes `datadream --help` and usage errors take seconds: importing these.
    code = ("import sys; from datadream.cli import build_parser; build_parser().parse_args(['registry', 'list', 'x']); "
            "print(' '.join(m for m in ('mlflow', 'torch', 'diffusers', 'transformers', 'kfp', 'open_clip', "
            "'optuna', 'boto3') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


def test_registry_kinds_match_the_registry():
    from datadream import registry, registry_cli

    assert registry_cli.KINDS == registry.KINDS


def test_compile_with_a_bad_param_leaves_no_yaml(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "-o", str(out), "--param", "shotz=3"]) == 2
    assert "--param shotz" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []
    out.write_text("old\n")  # a failed compile keeps an existing file whole
    assert main(["pipeline", "compile", "-o", str(out), "--param", "shots=many"]) == 2
    assert "--param shots=many" in _error_line(capsys)
    assert out.read_text() == "old\n" and list(tmp_path.iterdir()) == [out]
    assert main(["pipeline", "compile", "-o", str(out), "--param", "shots=3"]) == 0
    assert "shots" in out.read_text() and list(tmp_path.iterdir()) == [out]
    assert main(["pipeline", "compile", "-o", str(tmp_path / "p.json")]) == 2
    assert "expected a .yaml file name" in _error_line(capsys)


def test_schedule_checks_cron_before_compiling(monkeypatch, capsys):
    import pipelines.pipeline

    def no_compile(*a, **k):
        raise AssertionError("compiled before checking --cron")

    monkeypatch.setattr(pipelines.pipeline, "compile_pipeline", no_compile)
    assert main(["pipeline", "schedule", "--host", "http://127.0.0.1:9", "--cron", "0 3 * * 1"]) == 2
    assert "--cron '0 3 * * 1'" in _error_line(capsys)
