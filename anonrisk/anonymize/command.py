"""``command``: any external program as an anonymizer, run once per shard.

For each shard anonrisk makes a fresh work folder and writes the shard's originals (at the working size) to
``{input}`` as ``<name>.png``, where ``<name>`` is the record id as a flat, safe file name
(``external.flat_name``: ``person/img.jpg`` -> ``person%2Fimg%2Ejpg``). Beside ``{input}`` it writes
``{index}``, a JSON object mapping each name to its record id and seed (a stochastic program can seed each
image from it). It runs ``params.command`` through ``/bin/sh`` with the placeholders replaced by quoted
paths (``{input}``, ``{output}``, ``{index}``; also ``{shard}`` and ``{device}``) and the same values in
``ANONRISK_INPUT``, ``ANONRISK_OUTPUT``, ``ANONRISK_INDEX``, ``ANONRISK_SHARD``, ``ANONRISK_DEVICE``, plus
``params.env``. The program writes ``{output}/<name>.<any image extension>``.

- Its stdout and stderr go to the stage's log, ``log/command-<shard>.log``.
- A non-zero exit, ``params.timeout_s`` passing (the program's whole process group is killed) or a missing
  output is a DataError naming the shard and its log; the shards finished before are kept (their markers),
  so a rerun resumes with the failed one. Killing anonrisk kills the program too (Linux).
- The work folder (which holds copies of the originals) is removed after each shard, also on failure.
- Outputs of another size than the inputs are resized with a warning (``size_mismatch: resize``) or refused.

The command, ``env`` and ``revision`` name the stage (its fingerprint); the program itself is outside
anonrisk's sight: bump ``revision`` when its output for the same input changes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer, ShardInfo
from anonrisk.anonymize.external import OUTPUT_EXTS, fit_output, flat_name
from anonrisk.config.validation import Strict
from anonrisk.errors import DataError

log = logging.getLogger("anonrisk")
PLACEHOLDERS = ("{input}", "{output}", "{index}", "{shard}", "{device}")


class CommandParams(Strict):
    command: str  # e.g. "python my_anonymizer.py --in {input} --out {output}"
    env: dict[str, str] = {}  # added to anonrisk's environment
    timeout_s: Optional[float] = Field(None, gt=0)  # per shard
    size_mismatch: Literal["resize", "fail"] = "resize"
    gpu: bool = False  # the program uses a GPU: the Ray runner gives each worker one
    revision: str = ""  # bump when the program's output changes (it is not fingerprinted itself)
    work_dir: Optional[str] = None  # where the per-shard work folders go (default: the system's temp folder)

    @field_validator("command")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        missing = [p for p in ("{input}", "{output}") if p not in v]
        if missing:
            raise ValueError(f"the command must contain {' and '.join(missing)} (placeholders: {', '.join(PLACEHOLDERS)})")
        return v


# The guard between anonrisk and the program: the program runs in a process group of its own, and the guard
# kills that whole group (the shell and everything it started) when anonrisk dies, even by SIGKILL (the
# kernel sends the guard SIGTERM then: Linux PR_SET_PDEATHSIG), or when anonrisk stops it (timeout, Ctrl-C).
GUARD = """
import ctypes, os, signal, subprocess, sys
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(137)
child = subprocess.Popen(sys.argv[2:], start_new_session=True)
def stop(*_):
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    sys.exit(137)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
rc = child.wait()
sys.exit(rc if rc >= 0 else 128 - rc)
"""


@ANONYMIZERS.register("command")
class CommandAnonymizer(Anonymizer):
    Params = CommandParams
    per_shard = True

    def __init__(self, params: CommandParams, key: str = ""):
        super().__init__(params, key)
        self.device_kind = "gpu" if params.gpu else "cpu"
        self.device = "cpu"

    def setup(self, device: str = "cpu") -> None:
        self.device = device

    def describe(self) -> dict:
        p = self.p
        return {"class": type(self).__name__, "version": self.version,
                "params": {"command": p.command, "env": p.env, "revision": p.revision, "size_mismatch": p.size_mismatch}}

    def runtime(self) -> dict:
        return {"device": self.device, "backend": "external command"}

    def _run(self, work: Path, shard: ShardInfo, log_path: Path) -> None:
        values = {"{input}": work / "input", "{output}": work / "output", "{index}": work / "index.json",
                  "{shard}": "" if shard.index is None else shard.index, "{device}": self.device}
        cmd = self.p.command
        for k, v in values.items():
            cmd = cmd.replace(k, shlex.quote(str(v)))
        env = {**os.environ, **{f"ANONRISK_{k.strip('{}').upper()}": str(v) for k, v in values.items()}, **self.p.env}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shard.label()}: {cmd}\n".encode())
            out.flush()
            t0 = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-c", GUARD, str(os.getpid()), "/bin/sh", "-c", cmd], cwd=work, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=self.p.timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # a timeout, Ctrl-C or an error here: the guard kills the program's group, then itself
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
            out.write(f"--- exit status {rc} after {time.monotonic() - t0:.1f} s\n".encode())
        if rc is None:
            raise DataError(f"{self.key}: {shard.label()}: the command ran past params.timeout_s={self.p.timeout_s:g} s and was killed; "
                            f"its output: {log_path}. Finished shards are kept: rerun to resume")
        if rc != 0:
            raise DataError(f"{self.key}: {shard.label()}: the command exited with status {rc}{_last_line(log_path)}; its output: {log_path}. "
                            "Finished shards are kept: rerun to resume")

    def __call__(self, images: np.ndarray, seeds: Sequence[int], shard: Optional[ShardInfo] = None) -> np.ndarray:
        if shard is None or len(shard.records) != len(images):
            raise ValueError("the command anonymizer writes files named by record: call it with shard=ShardInfo(records)")
        names = [flat_name(r.id) for r in shard.records]
        if len(set(names)) != len(names):
            raise DataError(f"{self.key}: {shard.label()}: two record ids map to one file name")
        if self.p.work_dir:
            Path(self.p.work_dir).expanduser().mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="anonrisk-command-", dir=self.p.work_dir and str(Path(self.p.work_dir).expanduser())))
        log_dir = shard.log_dir or work
        log_path = log_dir / (f"command-{shard.index:05d}.log" if shard.index is not None else "command.log")
        try:
            (work / "input").mkdir()
            (work / "output").mkdir()
            for name, img in zip(names, images):
                Image.fromarray(img).save(work / "input" / f"{name}.png")
            index = {name: {"id": r.id, "seed": int(s)} for name, r, s in zip(names, shard.records, seeds)}
            (work / "index.json").write_text(json.dumps(index, indent=1))
            self._run(work, shard, log_path)
            return self._collect(work / "output", names, shard, images.shape[1:3], log_path)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _collect(self, out_dir: Path, names: list[str], shard: ShardInfo, hw: tuple[int, int], log_path: Path) -> np.ndarray:
        written: dict[str, list[Path]] = {}
        for f in out_dir.iterdir():
            stem, ext = os.path.splitext(f.name)
            if f.is_file() and ext.lower() in OUTPUT_EXTS:
                written.setdefault(stem, []).append(f)
        missing = [r.id for n, r in zip(names, shard.records) if len(written.get(n, [])) != 1]
        if missing:
            ambiguous = [r.id for n, r in zip(names, shard.records) if len(written.get(n, [])) > 1]
            what = f"several outputs for {len(ambiguous)}, e.g. {ambiguous[0]}" if ambiguous else "no output"
            raise DataError(f"{self.key}: {shard.label()}: the command wrote {what} for {len(missing)} of {len(names)} records "
                            f"(e.g. {', '.join(missing[:3])}; expected {out_dir.name}/<name>.<image extension> for every "
                            f"<name>.png in its input); its output: {log_path}. Finished shards are kept: rerun to resume")
        out, resized = [], 0
        for n, r in zip(names, shard.records):
            path = written[n][0]
            try:
                with Image.open(path) as im:
                    im, changed = fit_output(im.convert("RGB"), (hw[1], hw[0]), self.p.size_mismatch,
                                             f"{self.key}: {shard.label()}: output of record {r.id}")
                    out.append(np.asarray(im, dtype=np.uint8).copy())
            except OSError as exc:
                raise DataError(f"{self.key}: {shard.label()}: unreadable output for record {r.id}: {exc}") from None
            resized += changed
        if resized:
            log.warning("%s: %s: %d outputs differ in size from their inputs: resized (params.size_mismatch: fail refuses them)",
                        self.key, shard.label(), resized)
        return np.stack(out)


def _last_line(path: Path) -> str:
    """``: <the program's last line of output>`` (for the error message), or nothing."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("--- ")]
    except OSError:
        return ""
    return f" ({lines[-1].strip()[:200]})" if lines else ""
