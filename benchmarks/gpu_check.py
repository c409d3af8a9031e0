"""Every GPU-only path of anonrisk in one command, within a fixed time budget, each figure beside a reference.

    python benchmarks/gpu_check.py --device cuda          # one H100/H200: at most --budget 540 s (8 min hard)
    python benchmarks/gpu_check.py --device cpu --tiny    # the same paths at toy size (CI: tests/test_gpu_check.py)

Cases (a registry: ``--list`` names them, ``--only a,b`` picks some), each in a process of its own so that a
hung compile or a CUDA error costs that case only:
- ``diffusion_eager``: the diffusion anonymizer at SD 1.5 size (random weights, 512 px, 20 steps, one canny
  ControlNet, CFG 7.5) through ``ANONYMIZERS`` at batch 8/16/24, beside the bare diffusers
  ControlNet pipeline and the counted-FLOP floor (``benchmarks/anonymize_throughput.py`` measures).
- ``diffusion_compiled``: the same, torch.compile + fused QKV at batch 16, beside eager at 16.
- ``camouflage_base``: CAMOUFLaGE-Base's five ControlNets plus its identity branch, beside one ControlNet.
- ``xformers``: the anonymizer with xformers attention beside SDPA, only when xformers' kernels load.
- ``training``: contrastive training, R50 at 224 px, bf16: the torch engine and DeepSpeed ZeRO-2 (nccl,
  world size 1) through ``build_engine``, beside a bare PyTorch loop (``benchmarks/train_throughput.py``).
- ``gradcache``: one GradCache step at 32,768 pairs (chunk 512) with its peak memory, beside a plain step
  of one chunk.
- ``ray_actor``: the anonymize stage with ``anonymize.runner=ray`` and one GPU actor
  (``anonymize.ray.num_gpus_per_worker=1``), beside ``anonymize.runner=local``.
- plug-ins: the ``case_*`` functions (or a ``CASES`` dict) of ``benchmarks/gpu_cases_diffusion.py`` and
  ``benchmarks/gpu_cases_training.py`` when those modules exist (else listed as skipped, with the reason).
  A plug-in is called with the keywords it accepts of ``device``, ``tiny`` and ``scratch``, returns a dict,
  and may set ``fn.budget_s`` (default 60).

Budget: every case has its own seconds (``--tiny``: smaller ones; the built-in ones add up to 540) and runs
with that timeout only when that much of ``--budget`` is left, else it is skipped with the reason (plug-in
cases run after the built-in ones, in what those left over; ``--only`` runs them on their own). Results are
written after every case to ``results/benchmarks/gpu_check.{json,md}``, so a run stopped from outside still
leaves what it measured. Exit status 1 when a case failed or timed out (skips with a reason are fine).
``--tiny`` skips torch.compile (inductor needs minutes for the UNet on a CPU) and xformers (CUDA kernels).
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MARK = "GPU_CHECK_RESULT "
# the helpers' case modules; GPU_CHECK_PLUGINS (comma separated module names) adds more
PLUGINS = ("benchmarks.gpu_cases_diffusion", "benchmarks.gpu_cases_training")
CASES: dict[str, dict] = {}  # name -> {"fn", "budget_s", "tiny_budget_s"}


def case(budget_s: float, tiny_budget_s: float):
    def register(fn: Callable[[dict], dict]):
        CASES[fn.__name__] = {"fn": fn, "budget_s": budget_s, "tiny_budget_s": tiny_budget_s}
        return fn
    return register


# ---- the diffusion anonymizer ------------------------------------------------------------------------------
def _anonymizer_run(ctx: dict, *extra: str, batches: str, skip_bare: bool = True) -> dict:
    from benchmarks import anonymize_throughput

    tiny = ctx["tiny"]
    argv = ["--device", ctx["device"], "--size", "tiny" if tiny else "sd15", "--resolution", "32" if tiny else "512",
            "--steps", "2" if tiny else "20", "--iters", "1" if tiny else "2", "--warmup", "1", "--batch-sizes", batches,
            "--camouflage-batch", "0", "--out", str(Path(ctx["scratch"]) / "anonymize"), *extra]
    r = anonymize_throughput.main(argv + (["--skip-bare"] if skip_bare else []))
    rows = [{k: row.get(k) for k in ("batch", "anonymizer_img_s", "bare_img_s", "anonymizer_over_bare", "anonymizer_over_floor")}
            for row in r["rows"]]
    return {"config": r["config"], "floor_img_s": r["floor_img_s"], "peak_matmul_tflops": r["peak_matmul_tflops"],
            "tflop_per_image": r["flops"]["per_image"] / 1e12, "rows": rows, "camouflage": r.get("camouflage")}


@case(budget_s=110, tiny_budget_s=60)
def diffusion_eager(ctx: dict) -> dict:
    r = _anonymizer_run(ctx, batches="2" if ctx["tiny"] else "8,16,24", skip_bare=False)
    r["figures"] = [fig(f"anonymizer img/s, batch {row['batch']}", row["anonymizer_img_s"], "bare diffusers", row["bare_img_s"])
                    for row in r["rows"]]
    r["figures"] += [fig(f"anonymizer img/s, batch {row['batch']}", row["anonymizer_img_s"], "counted-FLOP floor", r["floor_img_s"])
                     for row in r["rows"]]
    return r


@case(budget_s=120, tiny_budget_s=40)
def diffusion_compiled(ctx: dict) -> dict:
    r = _anonymizer_run(ctx, *([] if ctx["tiny"] else ["--compile"]), "--fuse-qkv", batches="2" if ctx["tiny"] else "16")
    r["compiled"] = not ctx["tiny"]
    r["figures"] = [fig(f"{'compiled + ' if r['compiled'] else ''}fused QKV img/s, batch {row['batch']}", row["anonymizer_img_s"],
                        "counted-FLOP floor", r["floor_img_s"]) for row in r["rows"]]
    return r  # beside eager at the same batch: linked() below, from this run's diffusion_eager


@case(budget_s=60, tiny_budget_s=60)
def camouflage_base(ctx: dict) -> dict:
    batch = "2" if ctx["tiny"] else "8"
    r = _anonymizer_run(ctx, "--camouflage-batch", batch, batches=batch)
    cam = r["camouflage"]
    r["figures"] = [fig(f"CAMOUFLaGE-Base img/s, batch {batch} (5 ControlNets + identity branch)", cam["img_s"],
                        "one ControlNet", r["rows"][0]["anonymizer_img_s"]),
                    fig("counted FLOPs per image, CAMOUFLaGE-Base", cam["flops_over_one_controlnet"], "one ControlNet", 1.0, "x")]
    return r


@case(budget_s=40, tiny_budget_s=5)
def xformers(ctx: dict) -> dict:
    reason = _xformers_unavailable(ctx["device"])
    if reason:
        return {"skipped": reason}
    r = _anonymizer_run(ctx, "--attention", "xformers", batches="8")
    r["figures"] = [fig("xformers attention img/s, batch 8", r["rows"][0]["anonymizer_img_s"], "counted-FLOP floor", r["floor_img_s"])]
    return r  # beside SDPA at batch 8: linked()


def _xformers_unavailable(device: str):
    if not device.startswith("cuda"):
        return "xformers kernels are CUDA only"
    try:
        import torch
        import xformers.ops as xops

        q = torch.randn(1, 64, 8, 40, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return f"xformers kernels do not load: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    return None


# ---- contrastive training ----------------------------------------------------------------------------------
def _train_base(ctx: dict) -> dict:
    tiny = ctx["tiny"]
    return {"device": ctx["device"], "backbone": "test_resnet" if tiny else "resnet50", "image_size": 32 if tiny else 224,
            "embed_dim": 128, "precision": "fp32" if tiny else "bf16"}


@case(budget_s=60, tiny_budget_s=40)
def training(ctx: dict) -> dict:
    from benchmarks.train_throughput import run_worker

    tiny, base = ctx["tiny"], _train_base(ctx)
    batch = 8 if tiny else 256
    configs = [{"label": "bare", "kind": "bare", "chunk": None, "zero_stage": None},
               {"label": "torch", "kind": "torch", "chunk": None, "zero_stage": None},
               {"label": "deepspeed-zero2", "kind": "deepspeed", "chunk": None, "zero_stage": 2}]
    t = run_worker({"mode": "timing", "device": ctx["device"], "configs": configs, "common": {**base, "batch": batch},
                    "rounds": 2 if tiny else 6, "warmup": 1 if tiny else 2}, timeout=ctx["timeout"])
    missing = [c["label"] for c in configs if not t.get(c["label"], {}).get("img_per_s")]
    if missing:
        raise RuntimeError(f"no step time for {missing}: {t}")
    bare = t["bare"]["img_per_s"]
    backend = "nccl" if ctx["device"].startswith("cuda") else "gloo"
    return {"batch_pairs": batch, **base, "timing": t, "deepspeed_backend": backend,
            "figures": [fig(f"torch engine img/s ({base['backbone']}, {base['image_size']} px, {base['precision']})", t["torch"]["img_per_s"], "bare loop", bare),
                        fig(f"DeepSpeed ZeRO-2 img/s ({backend}, world size 1)", t["deepspeed-zero2"]["img_per_s"], "bare loop", bare)]}


@case(budget_s=90, tiny_budget_s=40)
def gradcache(ctx: dict) -> dict:
    from benchmarks.train_throughput import run_worker

    tiny, base = ctx["tiny"], _train_base(ctx)
    pairs, chunk = (256, 16) if tiny else (32768, 512)
    gc = run_worker({**base, "kind": "torch", "batch": pairs, "chunk": chunk, "warmup": 0}, timeout=ctx["timeout"])
    plain = run_worker({**base, "kind": "bare", "batch": chunk, "chunk": None, "warmup": 0}, timeout=ctx["timeout"])
    if not gc.get("fits") or not plain.get("fits"):
        raise RuntimeError(f"GradCache {pairs} pairs: {gc}; plain step of {chunk}: {plain}")
    return {"pairs": pairs, "chunk": chunk, **base, "gradcache": gc, "plain_chunk": plain,
            "figures": [fig(f"GradCache peak memory GB, {pairs} pairs (chunk {chunk})", gc["peak_mem_gb"],
                            f"plain step of {chunk} pairs", plain["peak_mem_gb"], "GB"),
                        fig(f"GradCache seconds per step, {pairs} pairs (first step)", gc["seconds"],
                            f"plain step of {chunk} pairs x {pairs // chunk}", plain["seconds"] * pairs / chunk, "s")]}


# ---- Ray ---------------------------------------------------------------------------------------------------
@case(budget_s=60, tiny_budget_s=50)
def ray_actor(ctx: dict) -> dict:
    from anonrisk.config.loader import load_config
    from anonrisk.pipeline import Pipeline
    from anonrisk.stages import read_json

    cuda = ctx["device"].startswith("cuda")
    preset = "controlnet-canny-tiny"
    common = ["progress=false", "tracking.mlflow=false", "data.image_size=32" if ctx["tiny"] else "data.image_size=64",
              "data.synthetic.identities=4", f"data.synthetic.images_per_identity={2 if ctx['tiny'] else 8}",
              f"anonymizers=[{preset}]", f"anonymize.device={'cuda' if cuda else 'cpu'}", "anonymize.batch_size=8"]
    out = {}
    for runner, extra in (("local", []), ("ray", ["anonymize.ray.num_workers=1", f"anonymize.ray.num_gpus_per_worker={1 if cuda else 0}",
                                                   "anonymize.ray.num_cpus=2", f"anonymize.ray.temp_dir={tempfile.mkdtemp(prefix='ray', dir='/tmp')}"])):
        root = Path(ctx["scratch"]) / f"ray-case-{runner}"
        cfg = load_config(REPO / "configs" / "quickstart.yaml", [*common, f"runs_dir={root}", f"results_dir={root}/results",
                                                                  f"anonymize.runner={runner}", *extra])
        stage = Pipeline(cfg).anonymize(preset)
        done = read_json(stage / "DONE")
        out[runner] = {k: done.get(k) for k in ("records", "computed", "seconds", "workers", "num_gpus_per_worker")}
        out[runner]["img_s"] = done["computed"] / done["seconds"]
    ray = out["ray"]
    if ray["workers"] != 1 or (cuda and ray["num_gpus_per_worker"] != 1):
        raise RuntimeError(f"expected one actor{' with one GPU' if cuda else ''}: {ray}")
    return {**out, "figures": [fig(f"Ray runner img/s ({ray['workers']} actor, {ray['num_gpus_per_worker']} GPU), whole stage",
                                   ray["img_s"], "local runner", out["local"]["img_s"])]}


# ---- plumbing ----------------------------------------------------------------------------------------------
def fig(name: str, value, reference_name: str, reference, unit: str = "img/s") -> dict:
    ratio = value / reference if value and reference else None
    return {"name": name, "value": value, "unit": unit, "reference_name": reference_name, "reference": reference, "ratio": ratio}


def plugin_cases() -> tuple[dict[str, dict], dict[str, str]]:
    """Cases from the plug-in modules that exist; the reason for each module that does not load."""
    found, skipped = {}, {}
    for mod in [*PLUGINS, *filter(None, os.environ.get("GPU_CHECK_PLUGINS", "").split(","))]:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            skipped[mod] = f"{mod} not found" + ("" if exc.name == mod else f" (it imports {exc.name}, which is missing)")
            continue
        fns = dict(getattr(m, "CASES", None) or {n: f for n, f in vars(m).items() if n.startswith("case_") and callable(f)})
        for name, fn in fns.items():
            budget = float(getattr(fn, "budget_s", 60))
            found[f"{mod.rsplit('.', 1)[-1].removeprefix('gpu_cases_')}:{name.removeprefix('case_')}"] = {
                "fn": _plugin(fn), "budget_s": budget, "tiny_budget_s": float(getattr(fn, "tiny_budget_s", budget))}
    return found, skipped


def _plugin(fn):
    """A plug-in case with the keywords it takes (``n`` images at ``batch``: 4 at 2 under --tiny, else its
    own defaults); a result without ``figures`` that has ``img_per_s`` gets one, beside ``stock_img_per_s``."""
    def call(ctx: dict) -> dict:
        accepted = inspect.signature(fn).parameters
        given = {**ctx, **({"n": 4, "batch": 2} if ctx["tiny"] else {})}
        r = fn(**{k: given[k] for k in ("device", "tiny", "scratch", "n", "batch") if k in accepted and k in given})
        if "figures" not in r and r.get("img_per_s"):
            r["figures"] = [fig(f"{r.get('case', fn.__name__)} img/s, batch {r.get('batch', '?')}", r["img_per_s"],
                                "stock diffusers pipeline", r.get("stock_img_per_s"))]
        return r
    return call


def all_cases() -> tuple[dict[str, dict], dict[str, str]]:
    plugins, skipped = plugin_cases()
    return {**CASES, **plugins}, skipped


def linked(results: dict) -> list[dict]:
    """Figures whose reference is another case of the same run: compiled and xformers beside eager."""
    eager = {r["batch"]: r["anonymizer_img_s"] for r in (results.get("diffusion_eager", {}).get("result") or {}).get("rows", [])}
    out = []
    for name, label in (("diffusion_compiled", "compiled + fused QKV"), ("xformers", "xformers")):
        result = results.get(name, {}).get("result") or {}
        label = label if result.get("compiled", True) else "fused QKV (not compiled: --tiny)"
        for row in result.get("rows", []):
            if row["batch"] in eager:
                out.append(fig(f"{label} img/s, batch {row['batch']}", row["anonymizer_img_s"], "eager SDPA (diffusion_eager)", eager[row["batch"]]))
    return out


def run_child(name: str, args, timeout: float, scratch: Path) -> dict:
    """One case in its own process; its result from the line it prints, or why there is none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-case", name, "--device", args.device, "--scratch", str(scratch),
           "--case-timeout", str(timeout)] + (["--tiny"] if args.tiny else [])
    t0 = time.monotonic()
    # a session of its own: on timeout the whole tree goes (train_throughput's workers are grandchildren)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"status": "timeout", "seconds": time.monotonic() - t0, "error": f"over its {timeout:.0f} s",
                "log": _keep_log(args, name, stdout, stderr)}
    seconds = time.monotonic() - t0
    lines = [ln[len(MARK):] for ln in stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
        return {"status": "skipped" if "skipped" in result else "ok", "seconds": seconds, "result": result}
    err = next((ln for ln in reversed(stderr.strip().splitlines()) if ln.strip()), f"exit status {proc.returncode}")
    return {"status": "error", "seconds": seconds, "error": err[:400], "log": _keep_log(args, name, stdout, stderr)}


def _keep_log(args, name: str, stdout: str, stderr: str) -> str:
    path = Path(args.out) / "gpu_check_logs" / f"{name.replace(':', '_')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"--- stdout\n{stdout[-20000:]}\n--- stderr\n{stderr[-20000:]}\n")
    return str(path)


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = f"{platform.machine()}, {os.cpu_count()} cores"
    return info


def write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_tiny" if doc["tiny"] else "gpu_check"
    tmp = out / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / f"{stem}.json")
    (out / f"{stem}.md").write_text(render(doc))


def render(doc: dict) -> str:
    env = doc["environment"]
    lines = ["# GPU check" + (" (--tiny)" if doc["tiny"] else ""), "",
             f"Written by `benchmarks/gpu_check.py {' '.join(doc['argv'])}` on {env.get('gpu') or env.get('cpu')}, {env['when']}; "
             f"torch {env['torch']}. {doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget"
             + (" (finished)." if doc.get("finished") else " (still running or stopped: partial)."), "",
             "| case | status | seconds | budget s |", "|---|---|---:|---:|"]
    for name, r in doc["cases"].items():
        note = r.get("error") or (r.get("result") or {}).get("skipped") or r.get("reason") or ""
        lines.append(f"| {name} | {r['status']}{': ' + note if note else ''} | {r.get('seconds', 0):.0f} | {r.get('budget_s', 0):.0f} |")
    lines += ["", "| figure | value | reference | reference value | ratio |", "|---|---:|---|---:|---:|"]
    figures = [f for r in doc["cases"].values() for f in (r.get("result") or {}).get("figures", [])] + doc.get("linked", [])
    for f in figures:
        v = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
        lines.append(f"| {f['name']} | {v(f['value'])} {f['unit']} | {f['reference_name']} | {v(f['reference'])} | {v(f['ratio'])} |")
    return "\n".join(lines) + "\n"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU check)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check (540: the 8-minute limit of one GPU lease, with a margin)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every case's budget (a loaded CI machine)")
    ap.add_argument("--only", default=None, help="comma separated case names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    ap.add_argument("--scratch", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cases, skipped = all_cases()
    if args.list:
        print("\n".join([*cases, *(f"{m} (skipped: {why})" for m, why in skipped.items())]))
        return 0
    if args.run_case:  # the child: one case, its result on one marked line
        ctx = {"device": args.device, "tiny": args.tiny, "scratch": args.scratch, "timeout": args.case_timeout}
        print(MARK + json.dumps(cases[args.run_case]["fn"](ctx), default=str), flush=True)
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        print(f"--only: unknown case(s) {', '.join(unknown)}; known: {', '.join(cases)}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="gpu_check-"))
    doc = {"argv": sys.argv[1:] if argv is None else list(argv), "tiny": args.tiny, "budget_s": args.budget, "elapsed_s": 0.0,
           "environment": environment(args.device), "cases": {}, "finished": False}
    doc["cases"].update({m: {"status": "skipped", "reason": why} for m, why in skipped.items()})
    for name in names:
        budget = cases[name]["tiny_budget_s" if args.tiny else "budget_s"] * args.budget_scale
        left = args.budget - (time.monotonic() - t0)
        if left < budget:  # a case runs with its whole budget or not at all (a cut-off case measures nothing)
            doc["cases"][name] = {"status": "skipped", "reason": f"out of budget (needs {budget:.0f} s, {left:.0f} s left)", "budget_s": budget}
        else:
            print(f"[gpu_check] {name} (budget {budget:.0f} s)", flush=True)
            doc["cases"][name] = {**run_child(name, args, budget, scratch), "budget_s": budget}
            print(f"[gpu_check] {name}: {doc['cases'][name]['status']} in {doc['cases'][name]['seconds']:.0f} s"
                  + (f": {doc['cases'][name]['error']}" if "error" in doc["cases"][name] else ""), flush=True)
        doc["elapsed_s"] = time.monotonic() - t0
        doc["linked"] = linked(doc["cases"])
        write(doc, Path(args.out))  # after every case: a run stopped from outside leaves what it measured
    doc["finished"] = True
    write(doc, Path(args.out))
    print(render(doc))
    return 1 if any(r["status"] in ("error", "timeout") for r in doc["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
