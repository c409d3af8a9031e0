"""Crash tests in the spirit of SQLite's: a tiny pipeline (synthetic faces, one anonymizer, a 4-step
contrastive training) killed by SIGKILL at seeded points (the k-th file put into place), run twice at once,
run out of disk on a small tmpfs, and run over corrupted files. Each ends in results identical to an
undisturbed run after a rerun, or in a clear error with nothing lost.

The runs are forked from the test process (no interpreter start-up per run) with one torch thread, as a
DataLoader worker would be; a kill point counts calls to ``os.replace`` (every atomic write ends in one), so
the points are deterministic and land inside every stage.
"""

import hashlib
import multiprocessing as mp
import os
import signal
import subprocess
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

CONFIG = {
    "name": "torture", "progress": False,
    "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"identities": 9, "images_per_identity": 2},
             "split": {"test_fraction": 0.34}},
    "anonymizers": ["noise"], "attacks": ["contrastive"],
    "train": {"backbone": "test_convnext", "input": "rgb", "batch_size": 4, "per_identity": 2, "steps": 4, "embed_dim": 8,
              "checkpoint_every": 2, "augment": False},
    "evaluate": {"bootstrap": 10, "leakage": False, "utility": {"enabled": False}},
    "tracking": {"mlflow": False},
}
#: the files that carry the numbers (timings and hosts, in DONE and the report, may differ)
NUMBERS = ("prepare/**/manifest.jsonl", "anonymize/**/manifest.jsonl", "anonymize/**/images/**/*.png", "train/**/encoder.safetensors",
           "train/**/log.jsonl", "evaluate/**/metrics.json", "quality/**/quality.json")


def write_config(tmp_path: Path, runs: Path, name: str = "torture") -> Path:
    path = tmp_path / f"{name}-{runs.name}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "name": name, "runs_dir": str(runs), "results_dir": str(tmp_path / "results")}))
    return path


def _child(config: str, kill_at: int, report: str) -> None:
    """Run the pipeline; SIGKILL itself at the ``kill_at``-th os.replace (0: never); the outcome to ``report``."""
    code = 0
    try:
        import torch

        from anonrisk.config import load_config
        from anonrisk.errors import AnonriskError
        from anonrisk.pipeline import Pipeline

        torch.set_num_threads(1)
        real, calls = os.replace, [0]

        def replace(src, dst):
            calls[0] += 1
            if calls[0] == kill_at:
                Path(report).write_text(f"killed putting {dst} into place")
                os.kill(os.getpid(), signal.SIGKILL)  # no finally, no cleanup: a real kill
            real(src, dst)

        os.replace = replace
        try:
            Pipeline(load_config(config)).run()
            Path(report).write_text(f"ok {calls[0]}")
        except AnonriskError as exc:
            code = 2
            Path(report).write_text(f"error {exc}")
    except BaseException:  # noqa: BLE001 - an unexpected failure: the test shows its traceback
        code = 3
        Path(report).write_text("crash " + traceback.format_exc())
    os._exit(code)


def run(config: Path, kill_at: int = 0, wait: bool = True):
    report = Path(f"{config}.{kill_at}.{os.urandom(4).hex()}.out")
    p = mp.get_context("fork").Process(target=_child, args=(str(config), kill_at, str(report)))
    p.start()
    if not wait:
        return p, report
    p.join(300)
    return p.exitcode, report.read_text() if report.exists() else ""


def numbers(runs: Path) -> dict[str, str]:
    return {str(p.relative_to(runs)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in NUMBERS for p in sorted(runs.glob(pattern)) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    code, out = run(write_config(tmp, tmp / "runs"))
    assert code == 0 and out.startswith("ok"), out
    return numbers(tmp / "runs"), int(out.split()[1])


def test_random_kill_points_then_a_rerun_gives_identical_results(tmp_path, reference):
    from anonrisk.launch.verify import verify

    ref, writes = reference
    assert len(ref) > 20 and writes > 30
    landed = set()
    rng = np.random.default_rng(15)  # one seeded point in each quarter of the writes: early to late stages
    for k in [int(rng.integers(1 + writes * i // 4, 1 + writes * (i + 1) // 4)) for i in range(4)]:
        runs = tmp_path / f"runs-{k}"
        config = write_config(tmp_path, runs)
        code, out = run(config, kill_at=k)
        assert code == -signal.SIGKILL, (k, code, out)
        put = Path(out.split("putting ")[1].removesuffix(" into place"))
        landed.add(put.relative_to(runs).parts[0] if put.is_relative_to(runs) else "results")
        code, out = run(config)
        assert code == 0 and out.startswith("ok"), (k, out)
        assert numbers(runs) == ref, f"kill at write {k} of {writes}: other results after the rerun"
        assert verify(str(runs))[1] == 0
    print(f"kill points landed in the {', '.join(sorted(landed))} stages of {writes} writes")
    assert len(landed) >= 3  # the seeded points spread over the stages


def test_two_concurrent_runs_share_one_set_of_stages(tmp_path, reference):
    runs = tmp_path / "runs"
    procs = [run(write_config(tmp_path, runs, name), wait=False) for name in ("first", "second")]
    for p, report in procs:
        p.join(300)
        assert p.exitcode == 0, report.read_text()
    assert numbers(runs) == reference[0]
    (log,) = runs.glob("train/**/log.jsonl")
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in log.read_text().splitlines()] == [0, 1, 2, 3]  # trained once


def test_a_full_disk_is_named_then_a_rerun_finishes(tmp_path, reference):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        config = write_config(tmp_path, mnt / "runs")
        code, out = run(config)
        assert code == 2 and "no space left on the device writing" in out and "free space and rerun" in out, out
        assert len(out.splitlines()) == 1
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        code, out = run(config)
        assert code == 0, out
        assert numbers(mnt / "runs") == reference[0]
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_corrupted_files_are_named_and_nothing_is_lost(tmp_path, reference):
    import shutil

    runs = tmp_path / "runs"
    config = write_config(tmp_path, runs)
    assert run(config)[0] == 0
    (image,) = sorted(runs.glob("anonymize/**/images/**/*.png"))[:1]
    image.write_bytes(image.read_bytes()[:50])  # a truncated output of a finished stage
    (evaluate_done,) = runs.glob("evaluate/**/DONE")
    (evaluate_done.parent / "metrics.json").unlink()  # a deleted result next to DONE
    kept = {k: v for k, v in numbers(runs).items() if not k.startswith(("anonymize", "evaluate"))}
    code, out = run(config)
    assert code == 2 and "metrics.json: missing, though the evaluate stage is DONE" in out, out
    shutil.rmtree(evaluate_done.parent)  # what the message says to do
    code, out = run(config)
    assert code == 2 and f"{image} (record " in out and "bytes" in out, out
    assert {k: v for k, v in numbers(runs).items() if k in kept} == kept  # nothing else touched
    shutil.rmtree(next(runs.glob("anonymize/*/*")))
    code, out = run(config)
    assert code == 0, out
    assert numbers(runs) == reference[0]
