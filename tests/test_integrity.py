"""Integrity of stage outputs: one writer per output folder, inputs checked against their manifests,
bad input as one line and exit 2, artifacts that follow the umask."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datadream.errors import UserError
from datadream.io import atomic_write_json, claim_output, lock_path

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, umask: int = -1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`datadream …` as a user runs it: its own process, its exit status and stderr."""
    return subprocess.run([sys.executable, "-m", "datadream.cli", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)}, umask=umask)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


# --- one writer per output folder ------------------------------------------------------------------------


def _claim_and_write(out: str, barrier, name: str, hold_s: float) -> str:
    barrier.wait()
    try:
        with claim_output(Path(out)) as o:
            o.mkdir(exist_ok=True)
            atomic_write_json(o / "who.json", {"name": name})
            time.sleep(hold_s)
            atomic_write_json(o / "done.json", {"name": name})
        return "won"
    except UserError as e:
        return f"lost: {e}"


def test_racing_writers_one_wins_the_others_name_the_holder(tmp_path):
    # forkserver, not fork: a child forked from a parent that has run torch multi-threaded can hang in OpenMP.
    ctx = multiprocessing.get_context("forkserver")
    n, rounds = 4, 8
    with ctx.Pool(n) as pool:
        for i in range(rounds):
            out = tmp_path / f"out{i}"
            barrier = ctx.Manager().Barrier(n) if i == 0 else barrier  # noqa: F821 - made in round 0
            results = pool.starmap(_claim_and_write, [(str(out), barrier, f"w{k}", 0.3) for k in range(n)])
            winners = [k for k, r in enumerate(results) if r == "won"]
            assert len(winners) == 1, results
            for r in results:
                if r != "won":
                    assert "another run is writing this folder" in r and f"host {socket.gethostname()}" in r
                    assert "pid " in r and "started 20" in r
            done = json.loads((out / "done.json").read_text())
            assert done == json.loads((out / "who.json").read_text()) == {"name": f"w{winners[0]}"}
            assert not lock_path(out).exists()  # released and removed after the block


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from pathlib import Path; from datadream.io import claim_output\n"
            "with claim_output(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"another run is writing this folder \(host .*pid {holder.pid}, started"
        with pytest.raises(UserError, match=busy), claim_output(out):
            pass
    finally:
        holder.kill()  # kill -9: no cleanup runs, the lock file stays behind
        holder.wait()
    assert lock_path(out).exists()
    with claim_output(out):  # the kernel dropped the dead holder's flock: taken over
        held = json.loads(lock_path(out).read_text())
        assert held["pid"] == os.getpid()
    assert not lock_path(out).exists()


_RACER = """
import os, sys, time
import datadream.stages.adapt, datadream.stages.fewshot  # imports done before the start signal
from datadream.cli import main
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.0005)
sys.exit(main(sys.argv[2:]))
"""


def race(tmp_path: Path, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run the CLI commands in their own processes, released at the same instant."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(go), "-q", *c], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
             for c in commands]
    time.sleep(8)  # every racer has imported and is waiting
    go.touch()
    results = []
    for p, c in zip(procs, commands, strict=True):
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return results


@pytest.mark.slow
def test_racing_adapt_runs_never_mix_an_output(tmp_path, fewshot_set):
    out = tmp_path / "ad"
    base = ["adapt", "--fewshot", str(fewshot_set), "--mode", "dataset", "--out", str(out), "--preset", "tiny"]
    results = race(tmp_path, [*base, "--set", "adapt.max_steps=6"], [*base, "--set", "adapt.max_steps=1"])
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [(r.returncode, r.stderr) for r in results]
    loser = next(r for r in results if r.returncode == 2)
    line = one_line(loser)
    assert "another run is writing this folder" in line or "holds a finished run with different inputs" in line
    winner = next(r for r in results if r.returncode == 0)
    steps = int(winner.args[-1].split("=")[1])
    unit = json.loads((out / "dataset" / "adapter.json").read_text())
    assert unit["steps"] == steps  # the unit and the index come from the same run
    # The same settings again: a no-op that rewrites nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = cli(*winner.args)
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.slow
def test_racing_fewshot_runs_fail_cleanly(tmp_path, demo_dataset):
    out = tmp_path / "fs"
    cmd = ["fewshot", "--dataset", str(demo_dataset), "--shots", "2", "--out", str(out), "--preset", "tiny"]
    results = race(tmp_path, cmd, cmd, cmd)
    assert all("Traceback" not in r.stderr for r in results), [r.stderr for r in results]
    assert sorted(r.returncode for r in results)[0] == 0
    for r in results:
        if r.returncode:
            assert "another run is writing this folder" in one_line(r)
    assert (out / "fewshot.json").is_file() and not lock_path(out).exists()


# --- inputs verified against their manifests -------------------------------------------------------------


def _main_error(capsys, argv: list[str]) -> str:
    from datadream.cli import main

    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_a_changed_or_deleted_shot_is_refused_not_trained_on(tmp_path, fewshot_set, capsys):
    from datadream.cli import main

    fs = tmp_path / "fs"
    shutil.copytree(fewshot_set, fs)
    args = ["adapt", "--fewshot", str(fs), "--mode", "dataset", "--preset", "tiny", "--set", "adapt.max_steps=1"]
    assert main(["-q", *args, "--out", str(tmp_path / "ad")]) == 0
    weights = tmp_path / "ad" / "dataset" / "pytorch_lora_weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good + b" ")
    line = _main_error(capsys, ["generate", "--fewshot", str(fs), "--adapters", str(tmp_path / "ad"), "--preset",
                                "tiny", "--out", str(tmp_path / "gen")])
    assert f"{weights}: changed since adapt wrote it" in line and not (tmp_path / "gen").exists()
    weights.write_bytes(good)
    manifest = (fs / "train.jsonl").read_text()
    (fs / "train.jsonl").write_text("".join(manifest.splitlines(keepends=True)[1:]))  # one shot dropped
    line = _main_error(capsys, [*args, "--out", str(tmp_path / "ad")])
    assert f"{fs / 'train.jsonl'}: changed since fewshot.json recorded it" in line
    (fs / "train.jsonl").write_text(manifest)
    shots = sorted((fs / "train").rglob("*.png"))
    shots[0].write_bytes(shots[1].read_bytes())  # replaced on disk; train.jsonl still has the old hash
    line = _main_error(capsys, [*args, "--out", str(tmp_path / "ad")])  # the finished run: not a stale no-op
    assert f"{shots[0]}: changed since" in line
    line = _main_error(capsys, [*args, "--out", str(tmp_path / "ad2")])
    assert f"{shots[0]}: changed since" in line
    assert not (tmp_path / "ad2").exists()  # nothing left behind, not even .fingerprint
    shots[0].unlink()
    line = _main_error(capsys, [*args, "--out", str(tmp_path / "ad2")])
    assert f"{shots[0]}: listed in" in line and "missing" in line
    assert not (tmp_path / "ad2").exists()


def test_manifest_entries_must_be_regular_files_inside_the_set(tmp_path, tiny):
    from helpers import colour_task

    from datadream.data.manifest import Record, read_manifest, write_manifest
    from datadream.io import sha256_file
    from datadream.stages import classify, evaluate

    fewshot, synthetic = colour_task(tmp_path, shots=2, test=1, synthetic_per_class=1)
    good = read_manifest(fewshot / "test.jsonl")
    outside = tmp_path / "elsewhere.png"
    shutil.copy(good[0].path, outside)
    link = fewshot / "test" / "link.png"
    link.symlink_to(outside)
    fifo = fewshot / "test" / "fifo.png"
    os.mkfifo(fifo)
    cases = {outside: "lies outside", link: "lies outside", fifo: "not a regular file"}
    for path, problem in cases.items():
        digest = sha256_file(outside)
        write_manifest(fewshot / "test.jsonl", [*good, Record(str(path), 0, "class0", digest, True)])
        t0 = time.monotonic()
        with pytest.raises(UserError, match=problem):
            read_manifest(fewshot / "test.jsonl")
        assert time.monotonic() - t0 < 5  # the FIFO is never opened
    # A stage refuses it before any work and leaves no output behind.
    write_manifest(fewshot / "val.jsonl", [*good, Record(str(fifo), 0, "class0", "0" * 64, True)])
    with pytest.raises(UserError, match="not a regular file"):
        classify.run(tiny("classify.epochs=0"), fewshot, synthetic, tmp_path / "clf")
    assert not (tmp_path / "clf").exists()
    write_manifest(fewshot / "test.jsonl", [*good, Record(str(fifo), 0, "class0", "0" * 64, True)])
    with pytest.raises(UserError, match="not a regular file"):
        evaluate.run(tiny(), tmp_path / "no-classifier-needed", fewshot / "test.jsonl", tmp_path / "ev")


# --- bad input: one line, exit 2, nothing half-written ---------------------------------------------------


@pytest.mark.parametrize(("override", "expected"), [
    ("classify.lr=.inf", "'classify.lr': Input should be a finite number"),
    ("adapt.alpha=1e400", "'adapt.alpha': Input should be a finite number"),
    ("classify.lr=.nan", "'classify.lr': Input should be a finite number"),
    ("generate.images_per_class=1000000000000", "'generate.images_per_class': Input should be less than or equal"),
    ("adapt.resolution=1000000000", "'adapt.resolution': Input should be less than or equal to 4096"),
    ("adapt.betas=[0.9, 1.5]", "'adapt.betas.1': Input should be less than 1"),
    ("data.template=a photo of a {nam}", "unknown field {nam}; a template may use {domain} and {name}"),
    ("data.template=a photo", "must contain {name}"),
    ("data.template={name} photo", "--set data.template: value '{name} photo' is not valid YAML"),
])
def test_config_values_out_of_range_are_refused(override, expected):
    from datadream.config import load_config

    with pytest.raises(UserError, match=re.escape(expected)):
        load_config("tiny", overrides=[override])


def test_text_inputs_must_be_utf8(tmp_path, capsys, demo_dataset):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"adapt:\n  rank: 4  # caf\xe9\n")
    line = _main_error(capsys, ["fewshot", "--dataset", str(demo_dataset), "--config", str(bad),
                                "--out", str(tmp_path / "o")])
    assert f"config file {bad}: not valid UTF-8" in line
    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    (data / "classnames.json").write_bytes(b'{"circle": "caf\xe9"}')
    line = _main_error(capsys, ["fewshot", "--dataset", str(data), "--shots", "1", "--out", str(tmp_path / "o")])
    assert f"{data / 'classnames.json'}: not valid UTF-8" in line
    assert not (tmp_path / "o").exists()


def test_out_inside_a_file_or_read_only_fails_before_any_work(tmp_path, capsys, demo_dataset):
    (tmp_path / "file").write_text("x")
    args = ["fewshot", "--dataset", str(demo_dataset), "--shots", "1", "--preset", "tiny"]
    line = _main_error(capsys, [*args, "--out", str(tmp_path / "file" / "fs")])
    assert f"{tmp_path / 'file'} is a file, not a folder" in line
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere it may; sysfs refuses even root
        ro = Path("/sys")
    t0 = time.monotonic()
    line = _main_error(capsys, [*args, "--out", str(ro / "fs")])
    assert str(ro) in line and ("permission denied" in line or "read-only" in line)
    assert time.monotonic() - t0 < 20  # before the scan of the dataset, not after


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifacts_follow_the_umask(tmp_path, demo_dataset, umask):
    out = tmp_path / "fs"
    r = cli("fewshot", "--dataset", str(demo_dataset), "--shots", "1", "--preset", "tiny", "--out", str(out),
            umask=umask)
    assert r.returncode == 0, r.stderr
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert Path("fs/train.jsonl") in modes and Path("fs") in modes
    for p, mode in modes.items():
        assert mode == (0o777 if (tmp_path / p).is_dir() else 0o666) & ~umask, (p, oct(mode))


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, demo_dataset, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # every atomic write ends in fsync: the first one fails
    out = tmp_path / "fs"
    line = _main_error(capsys, ["fewshot", "--dataset", str(demo_dataset), "--shots", "1", "--preset", "tiny",
                                "--out", str(out)])
    assert "no space left on the device; free some space and re-run" in line and str(tmp_path) in line
    assert not out.exists() and not lock_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the staging folder is gone too


# --- class names -------------------------------------------------------------------------------------------


def _folder_dataset(root: Path, names: list[str], per_class: int = 3) -> Path:
    from PIL import Image

    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * k % 256, 10 * i, 90)).save(root / name / f"{i}.png")
    return root


def test_class_names_keep_their_letters_and_problems_are_named(tmp_path, caplog):
    from datadream.config import DataConfig
    from datadream.data.imagefolder import scan_imagefolder
    from datadream.data.manifest import slugify

    assert [slugify(n) for n in ("猫", "犬", "Café", "F/A-18", "ﬁsh", "  ", "São Paulo")] == [
        "猫", "犬", "café", "f_a-18", "fish", "class", "são_paulo"]
    root = _folder_dataset(tmp_path / "d1", ["猫", "犬", "Café", ".ipynb_checkpoints"])
    with caplog.at_level("INFO"):
        index = scan_imagefolder(root, DataConfig())
    assert [(c.slug, c.name) for c in index.classes] == [("café", "Café"), ("犬", "犬"), ("猫", "猫")]
    assert "skipping 1 hidden folder(s): '.ipynb_checkpoints'" in caplog.text
    root = _folder_dataset(tmp_path / "d2", ["Cat", "cat"])
    with pytest.raises(UserError, match="class folders 'Cat' and 'cat' map to one slug 'cat'"):
        scan_imagefolder(root, DataConfig())
    root = _folder_dataset(tmp_path / "d3", ["dog", "cat\nignore the above"])
    with pytest.raises(UserError, match=r"class folder 'cat\\nignore the above' has a control character"):
        scan_imagefolder(root, DataConfig())
    from datadream.data import formats

    with pytest.raises(UserError, match=r"class 'b' \('B\\nC'\) has a control character"):  # a class-name file
        formats._build(tmp_path, [("a", "A"), ("b", "B\nC")], {"train": [], "test": []}, DataConfig(), "names.txt")


def test_progress_bars_only_at_a_terminal_and_never_with_q(tmp_path, demo_dataset):
    import pty

    args = [sys.executable, "-m", "datadream.cli", "fewshot", "--dataset", str(demo_dataset), "--shots", "1",
            "--preset", "tiny"]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | {"PYTHONPATH": str(REPO)}
    piped = subprocess.run([*args, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env)
    assert piped.returncode == 0 and "fewshot: done" in piped.stderr and "%|" not in piped.stderr
    leader, follower = pty.openpty()
    quiet = subprocess.run([*args, "-q", "--out", str(tmp_path / "b")], stderr=follower, env=env)
    os.close(follower)
    seen = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 65536):
            seen += chunk
    os.close(leader)
    assert quiet.returncode == 0 and b"%|" not in seen and b"fewshot: done" not in seen, seen


def test_a_changed_classifier_is_refused(tmp_path, tiny):
    from helpers import colour_task

    from datadream.stages import classify, evaluate

    fewshot, synthetic = colour_task(tmp_path, shots=2, test=1, synthetic_per_class=1)
    clf = classify.run(tiny("classify.epochs=0"), fewshot, synthetic, tmp_path / "clf")
    evaluate.load_classifier(clf, tiny().models, device="cpu")
    head = clf / classify.HEAD_FILE
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match=f"{head}: missing or changed since classify wrote it"):
        evaluate.run(tiny(), clf, fewshot / "test.jsonl", tmp_path / "ev")
    assert not (tmp_path / "ev").exists()
