"""Throughput of the Ray runner with 1, 2, ... workers beside the single-process runner, in the same run.

    python benchmarks/anonymize_scaling.py                       # resynth at 128 px, 1200 faces, 1 and 2 workers
    python benchmarks/anonymize_scaling.py --tiny-diffusion     # also the sd-nocond-tiny preset at 64 px

What is timed: one call of ``anonymize_local`` / ``anonymize_ray`` over the same prepared synthetic dataset,
each into a fresh stage directory (decode, anonymize, atomic PNG writes, shard markers, manifest; for Ray
also actor start and model setup, the decode tasks and the dispatch). Ray itself is started once
(``ray.init``, in-process, and one untimed Ray Data run for its helper actors) before the timed calls, as a
cluster is started once for many stages. The runs are interleaved (local, ray x1, ray x2, local, ...)
``--reps`` times; the best and the median are reported, so that load from other processes on the machine
hits every variant alike. Steady state is each worker's rate between its first and its last shard marker,
summed over the workers. Outputs of every Ray run are compared with the local run's, byte for byte.

The model of larger clusters: with the measured Ray overhead per shard ``o`` (s), per-record overhead and
one worker's throughput ``r`` (img/s), a shard of ``S`` records costs ``S/r + o`` on a worker, so N workers
reach ``N * r * e`` with ``e = (S/r) / (S/r + o)``, until the driver (one dispatch per shard, ``o_d``
s of driver time) or the decode CPUs saturate. The GPU projection uses ``r`` = 8 img/s per H100 for SD 1.5
at 512 px (measured, /work/shared/REAL_SERVICES.md: torch.compile + fused QKV, batch 16-24). Results go
to ``results/benchmarks/anonymize_scaling.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15_IMG_PER_S_PER_H100 = 8.0  # REAL_SERVICES.md: 7.65 at batch 16, 8.05 at batch 24 (compile + fused QKV)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anonymizer", default="resynth", help="a classical kind (default resynth)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--identities", type=int, default=150)
    ap.add_argument("--images-per-identity", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny-diffusion", action="store_true", help="also time the sd-nocond-tiny preset at 64 px")
    ap.add_argument("--tiny-records", type=int, default=160)
    ap.add_argument("--reproject", action="store_true", help="only redo the model and report from the stored JSON")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    return ap.parse_args(argv)


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def same_outputs(a: Path, b: Path) -> bool:
    names = sorted(str(p.relative_to(a / "images")) for p in (a / "images").rglob("*.png"))  # ids are relative paths
    return names == sorted(str(p.relative_to(b / "images")) for p in (b / "images").rglob("*.png")) and all(
        (a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in names)


def time_variant(name, spec, records, data_fp, image_size, cfg, workers, scratch) -> dict:
    """One timed anonymize call into a fresh stage directory, with a freshly built anonymizer."""
    from anonrisk.anonymize import build_anonymizer
    from anonrisk.anonymize.ray_runner import anonymize_ray
    from anonrisk.anonymize.runner import AnonymizeJob, anonymize_local
    from anonrisk.plan import anonymize_fingerprint
    from anonrisk.stages import StageDir, read_json

    anonymizer = build_anonymizer(spec)
    # a fresh directory per timed call (not the content-addressed runs dir): every call does the whole work
    stage = StageDir(scratch / f"{name}-{time.monotonic_ns()}", "anonymize", data_fp, anonymize_fingerprint(anonymizer, image_size, cfg.seed))
    t0 = time.perf_counter()
    if workers == 0:
        anonymize_local(AnonymizeJob(spec, anonymizer, records, stage, image_size, cfg.model_copy(update={"device": "cpu"}), progress=False))
    else:
        c = cfg.model_copy(update={"runner": "ray", "ray": cfg.ray.model_copy(update={"num_workers": workers})})
        anonymize_ray(AnonymizeJob(spec, anonymizer, records, stage, image_size, c, progress=False))
    seconds = time.perf_counter() - t0
    summary = read_json(stage / "DONE")
    ready = summary.get("first_ready_seconds", 0.0)
    return {"seconds": seconds, "images_per_second": len(records) / seconds, "stage": stage.path, "ready_seconds": ready,
            "after_ready_seconds": seconds - ready, "steady_images_per_second": steady_rate(stage.path / "shards"),
            "driver_cpu_seconds": summary.get("driver_cpu_seconds", 0.0), "shards": summary["shards"]}


def steady_rate(markers: Path) -> float:
    """Steady-state img/s, the same clock for every runner: for each worker, the records of its shards after its
    first, over the time from its first shard marker to its last (file times), summed over the workers. Start,
    model setup, first-shard warm-up and teardown are left out."""
    from anonrisk.stages import read_json

    by_worker: dict = {}
    for m in markers.glob("*.json"):
        doc = read_json(m)
        by_worker.setdefault(doc.get("worker", {}).get("pid"), []).append((m.stat().st_mtime, doc["records"]))
    rate = 0.0
    for marks in by_worker.values():
        marks.sort()
        span = marks[-1][0] - marks[0][0]
        rate += sum(n for _, n in marks[1:]) / span if span > 0 else 0.0
    return rate


def bench(label, spec, records, data_fp, image_size, cfg, workers, reps, scratch) -> dict:
    variants = [0] + workers
    runs = {w: [] for w in variants}
    identical = True
    for rep in range(reps):
        for w in variants:
            r = time_variant(f"{label}-w{w}", spec, records, data_fp, image_size, cfg, w, scratch)
            runs[w].append(r)
            print(f"{label} rep {rep} {'local' if w == 0 else f'ray x{w}'}: {r['seconds']:.2f} s "
                  f"({r['images_per_second']:.1f} img/s) load {load_avg()}", flush=True)
        for w in workers:
            identical &= same_outputs(runs[w][-1]["stage"], runs[0][-1]["stage"])
        for w in variants:  # keep the disk small
            shutil.rmtree(runs[w][-1]["stage"].parents[2], ignore_errors=True)
    # the fastest repetition is the least disturbed by the machine's other load; the median is reported beside it
    best = {w: min(r["seconds"] for r in runs[w]) for w in variants}
    med = {w: statistics.median(r["seconds"] for r in runs[w]) for w in variants}
    after_ready = {w: min(r["after_ready_seconds"] for r in runs[w]) for w in variants}
    steady = {w: max(r["steady_images_per_second"] for r in runs[w]) for w in variants}
    n = len(records)
    rows = [{"runner": "local" if w == 0 else "ray", "workers": max(w, 1), "seconds_min": best[w], "seconds_median": med[w],
             "seconds_all": [round(r["seconds"], 3) for r in runs[w]], "images_per_second": n / best[w],
             "vs_local": best[0] / best[w], "vs_local_median": med[0] / med[w],
             "ready_seconds": statistics.median(r["ready_seconds"] for r in runs[w]),
             "after_ready_seconds": after_ready[w], "after_ready_vs_local": after_ready[0] / after_ready[w],
             "steady_images_per_second": steady[w], "steady_vs_local": steady[w] / steady[0],
             "steady_vs_local_median": statistics.median(r["steady_images_per_second"] for r in runs[w])
             / statistics.median(r["steady_images_per_second"] for r in runs[0]),
             "steady_all": [round(r["steady_images_per_second"], 1) for r in runs[w]],
             "after_ready_all": [round(r["after_ready_seconds"], 3) for r in runs[w]],
             "driver_cpu_seconds": statistics.median(r["driver_cpu_seconds"] for r in runs[w])}
            for w in variants]
    return {"label": label, "anonymizer": spec.model_dump(), "records": n, "image_size": image_size,
            "shard_size": cfg.shard_size, "batch_size": cfg.batch_size, "shards": runs[0][0]["shards"],
            "rows": rows, "outputs_identical": identical}


def model(result: dict) -> dict:
    """Overheads from the measured rows and their projection to N workers (see the module docstring)."""
    rows = {(r["runner"], r["workers"]): r for r in result["rows"]}
    local, one = rows[("local", 1)], rows[("ray", 1)]
    shards = result["shards"]
    r1 = result["records"] / local["seconds_min"]  # one worker's compute rate (the local runner has no overhead)
    # Ray's cost per shard: everything after the first actor is ready (actor start + model load are paid once per stage)
    overhead_per_shard = max(0.0, (one["after_ready_seconds"] - local["seconds_min"]) / shards)  # errs on the slow side
    out = {"local_images_per_second": r1, "ray_overhead_seconds_per_shard": overhead_per_shard,
           "startup_seconds": one["ready_seconds"], "driver_cpu_seconds_per_shard": one["driver_cpu_seconds"] / shards}
    if ("ray", 2) in rows:
        t1, t2 = one["after_ready_seconds"], rows[("ray", 2)]["after_ready_seconds"]
        serial = min(1.0, max(0.0, 2 * t2 / t1 - 1))  # Amdahl: T2/T1 = s + (1 - s)/2
        out["amdahl_serial_fraction"] = serial
        out["speedup_2_workers"] = t1 / t2
    return out


def png_write_seconds(size: int = 512, n: int = 8) -> float:
    """Median time to write one PNG at ``size`` px (the actor writes outputs between GPU batches)."""
    from anonrisk.data.io import save_image
    from anonrisk.data.synthetic import render_image

    times = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(n):
            img = render_image(0, i, 0, size)
            t = time.perf_counter()
            save_image(Path(d) / f"{i}.png", img)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def projection(overhead_per_shard: float, driver_cpu_per_shard: float, write_per_image: float, shard_size: int = 256,
               per_gpu: float = SD15_IMG_PER_S_PER_H100, write_threads: int = 2, batch: int = 16,
               gpus=(1, 2, 4, 8, 16, 64, 256, 1024, 4096, 16384)) -> list[dict]:
    """SD 1.5 on H100s: a GPU actor spends shard_size/per_gpu s generating a shard; its ``write_threads`` PNG
    writers (``write_per_image`` s each) run beside the GPU, so only what they cannot keep up with plus the
    last batch's writes is exposed; Ray adds ``overhead_per_shard``. The driver spends
    ``driver_cpu_per_shard`` s of its CPU per shard, which caps the whole cluster at shard_size /
    driver_cpu_per_shard img/s."""
    shard_s = shard_size / per_gpu
    exposed_writes = max(0.0, shard_size * write_per_image / write_threads - shard_s) + batch * write_per_image / write_threads
    eff = shard_s / (shard_s + exposed_writes + overhead_per_shard)
    driver_cap = shard_size / driver_cpu_per_shard if driver_cpu_per_shard > 0 else float("inf")
    rows = []
    for n in gpus:
        ideal = n * per_gpu
        modeled = min(ideal * eff, driver_cap)
        rows.append({"gpus": n, "ideal_img_s": ideal, "modeled_img_s": modeled, "efficiency": modeled / ideal,
                     "celeba_hours": 202_599 / modeled / 3600})
    return rows


def add_projection(doc: dict, out: Path | None = None) -> None:
    """The SD 1.5 projection from the measured rows: the probe's Ray overhead (its per-shard cost with almost no
    work to hide it) or the main run's, whichever is larger, so that the projection errs on the slow side."""
    for r in doc["results"]:
        r["model"] = model(r)
    main_m = doc["results"][0]["model"]
    probe_m = next((r["model"] for r in doc["results"] if r["label"].startswith("overhead-probe")), main_m)
    overhead = max(probe_m["ray_overhead_seconds_per_shard"], main_m["ray_overhead_seconds_per_shard"])
    driver = max(probe_m["driver_cpu_seconds_per_shard"], main_m["driver_cpu_seconds_per_shard"])
    source = "this run's 1-2 workers"
    # the costs measured at cluster size (benchmarks/anonymize_scaling_cluster.py, 16-64 fake-GPU actors), if larger
    cluster = Path(out or REPO / "results" / "benchmarks") / "anonymize_scaling_cluster.json"
    if cluster.exists():
        c = json.loads(cluster.read_text())["costs"]
        if c["overhead_seconds_per_shard"] >= overhead or c["driver_cpu_seconds_per_shard"] >= driver:
            source = f"{c['from_actors']} fake-GPU actors (anonymize_scaling_cluster.md)"
        overhead, driver = max(overhead, c["overhead_seconds_per_shard"]), max(driver, c["driver_cpu_seconds_per_shard"])
    write_s = png_write_seconds()
    ok = [size for size in (16, 32, 64, 128, 256, 512, 1024)
          if projection(overhead, driver, write_s, shard_size=size, gpus=(64,))[0]["efficiency"] >= 0.95]
    doc["projection_sd15_h100"] = {"per_gpu_img_s": SD15_IMG_PER_S_PER_H100, "shard_size": 256, "costs_from": source,
                                   "overhead_seconds_per_shard": overhead, "driver_cpu_seconds_per_shard": driver,
                                   "png_write_seconds_512px": write_s, "rows": projection(overhead, driver, write_s),
                                   "shard_size_for_95_at_64": ok[0] if ok else None}


def main(argv=None) -> dict:
    args = parse(argv)
    if args.reproject:  # recompute the model and the report from the stored measurements
        path = Path(args.out) / "anonymize_scaling.json"
        doc = json.loads(path.read_text())
        add_projection(doc, Path(args.out))
        write(doc, Path(args.out))
        return doc
    import ray

    from anonrisk.config.schema import AnonymizeConfig, DataConfig, Spec
    from anonrisk.pipeline import prepare_data as prepare

    workers = [int(w) for w in args.workers.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="anonrisk-scaling-"))
    ray_tmp = tempfile.mkdtemp(prefix="anonrisk-ray-", dir="/tmp")
    results = []
    try:
        t0 = time.perf_counter()
        # workers at the local runner's priority (Ray's default is nice 15: under load from other processes a
        # niced actor loses the CPU to them, which measures the machine's neighbours, not the runner)
        # (RAY_TMPDIR and RAY_worker_niceness: Ray's own environment settings, read when it starts)
        os.environ.update(RAY_TMPDIR=ray_tmp, RAY_worker_niceness="0")
        ray.init(num_cpus=max(workers), include_dashboard=False, object_store_memory=300 << 20, log_to_driver=False)
        ray_init = time.perf_counter() - t0
        data = DataConfig(image_size=args.image_size, synthetic={"identities": args.identities, "images_per_identity": args.images_per_identity})
        stage, records = prepare(data, str(scratch / "data"), progress=False)
        cfg = AnonymizeConfig(shard_size=args.shard_size, batch_size=args.batch_size)
        spec = Spec(name=args.anonymizer, kind=args.anonymizer)
        data_p = DataConfig(image_size=64, synthetic={"identities": 50, "images_per_identity": 8})
        st_p, rec_p = prepare(data_p, str(scratch / "data-probe"), progress=False)
        # untimed: the first Ray Data run of a cluster starts its cluster-wide helper actors (stats, autoscaling
        # coordinator, locality), ~3 s of CPU that a cluster pays once, like ray.init
        time_variant("warm-up", Spec(name="identity", kind="identity"), rec_p, st_p.fingerprint, 64, AnonymizeConfig(shard_size=8), 1, scratch)
        results.append(bench(f"{args.anonymizer}-{args.image_size}px", spec, records, stage.fingerprint, args.image_size, cfg, workers, args.reps, scratch))
        # Ray's own cost per shard, nearly alone: the identity anonymizer on many small shards
        probe = bench("overhead-probe: identity-64px", Spec(name="identity", kind="identity"), rec_p, st_p.fingerprint, 64,
                      AnonymizeConfig(shard_size=8, batch_size=8), [1], args.reps, scratch)
        if args.tiny_diffusion:
            from anonrisk.config import load_config

            tiny = load_config(None, ["anonymizers=[sd-nocond-tiny]"]).anonymizers[0]
            data64 = DataConfig(image_size=64, synthetic={"identities": args.tiny_records // 8, "images_per_identity": 8})
            st64, rec64 = prepare(data64, str(scratch / "data64"), progress=False)
            cfg64 = AnonymizeConfig(shard_size=16, batch_size=8)
            results.append(bench("sd-nocond-tiny-64px", tiny, rec64, st64.fingerprint, 64, cfg64, workers, args.reps, scratch))
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_after": load_avg(), "ray_version": ray.__version__, "ray_init_seconds": ray_init,
        "contention": "the CPUs are shared with other jobs (see load averages); every variant runs interleaved under the same load",
        "results": results + [probe],
    }
    add_projection(doc, Path(args.out))
    write(doc, Path(args.out))
    return doc


def write(doc: dict, out: Path) -> None:
    from anonrisk.stages import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    for r in doc["results"]:
        r["rows"] = [{k: v for k, v in row.items()} for row in r["rows"]]
    with atomic_path(out / "anonymize_scaling.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    lines = ["# Anonymize stage: Ray runner scaling", "",
             "Written by `benchmarks/anonymize_scaling.py`. Interleaved repetitions; `best` is the fastest (least "
             "disturbed by other load), the median beside it. Each timed call includes actor start and model setup "
             "(Ray itself started once before) and a freshly built anonymizer. `vs local` = local seconds / these "
             "seconds (same run, same load); `after ready` starts when the first actor is ready; `steady` is each worker's rate "
             "from its first shard marker to its last (see below).", "",
             f"{doc['when']}; {doc['host']}; Ray {doc['ray_version']} (ray.init {doc['ray_init_seconds']:.1f} s, untimed); "
             f"load average after the run {doc['load_average_after']}. {doc['contention']}.", ""]
    load = doc["load_average_after"][0] if doc["load_average_after"] else 0.0
    cpus = int(doc["host"].split(", ")[1].split()[0]) if ", " in doc["host"] else 0
    if cpus and load > cpus:
        lines += [f"The machine's load average ({load:.1f}) exceeded its {cpus} CPUs: other processes held the cores, so a "
                  "second worker had no free core to scale onto and the two-worker figures record that contention, not "
                  "the runner. End-to-end figures of the diffusion preset are dominated by each actor's import of "
                  "torch/diffusers in a fresh process (`first actor ready`), which the single process pays once.", ""]
    for r in doc["results"]:
        m = r["model"]
        lines += [f"## {r['label']}: {r['records']} records, shards of {r['shard_size']}, batch {r['batch_size']}", "",
                  "| runner | workers | best s | img/s | vs local | median s | vs local (medians) | first actor ready s | after ready vs local | steady img/s | steady vs local | steady vs local (medians) | all runs (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['runner']} | {row['workers']} | {row['seconds_min']:.2f} | {row['images_per_second']:.1f} | "
                         f"{row['vs_local']:.2f} | {row['seconds_median']:.2f} | {row['vs_local_median']:.2f} | {row['ready_seconds']:.2f} | "
                         f"{row['after_ready_vs_local']:.2f} | {row['steady_images_per_second']:.1f} | {row['steady_vs_local']:.2f} | {row['steady_vs_local_median']:.2f} | {', '.join(f'{s:.2f}' for s in row['seconds_all'])} |")
        lines += ["", "`after ready` = the whole call less the time until the first actor was ready (actor process start and "
                      "model setup are paid once per stage and worker; on a GPU they are the model load). `steady` = per worker, "
                      "the records of its shards after its first, over the time from its first shard marker to its last (file "
                      "times, the same clock for every runner), summed over the workers; best of the repetitions.", "",
                  f"Outputs byte-identical to the local runner's: **{r['outputs_identical']}**. Startup {m['startup_seconds']:.2f} s; "
                      f"Ray overhead {m['ray_overhead_seconds_per_shard'] * 1000:.1f} ms per shard after the first actor is ready; driver CPU "
                      f"{m['driver_cpu_seconds_per_shard'] * 1000:.1f} ms per shard"
                  + (f"; two workers {m['speedup_2_workers']:.2f}x one (Amdahl serial fraction {m['amdahl_serial_fraction']:.2f})." if "speedup_2_workers" in m else "."), ""]
    p = doc["projection_sd15_h100"]
    lines += ["## Projection: SD 1.5 at 512 px on N H100s", "",
              f"Per GPU {p['per_gpu_img_s']:g} img/s (measured, REAL_SERVICES.md); shards of {p['shard_size']}; Ray overhead "
              f"{p['overhead_seconds_per_shard'] * 1000:.1f} ms per shard (measured above on a loaded 2-core CPU); "
              f"driver CPU {p['driver_cpu_seconds_per_shard'] * 1000:.1f} ms per shard (costs from {p.get('costs_from', 'this run')}); PNG write {p['png_write_seconds_512px'] * 1000:.1f} ms "
              "per 512 px image (measured here), 2 writer threads beside the GPU (`anonymize.write_threads`), batch 16. "
              "Throughput(N) = min(N x per-GPU x e, driver cap), e = generation time of a shard / (generation + exposed PNG "
              "writes + Ray overhead), driver cap = shard size / driver CPU per shard. Written inline (write_threads=0) the "
              "PNGs alone would cost a third of the GPU time at these figures. Startup (model load, "
              "~1-2 min with torch.compile) is not in it. "
              "CelebA = 202,599 images.", ""]
    if "shard_size_for_95_at_64" in p:
        lines += [f"**Smallest shard size with efficiency >= 95 % at 64 GPUs: {p['shard_size_for_95_at_64']}** (of 16 ... 1024).", ""]
    lines += ["| GPUs | ideal img/s | modeled img/s | efficiency | CelebA hours |", "|---:|---:|---:|---:|---:|"]
    for row in p["rows"]:
        lines.append(f"| {row['gpus']} | {row['ideal_img_s']:.0f} | {row['modeled_img_s']:.0f} | {row['efficiency']:.3f} | {row['celeba_hours']:.2f} |")
    with atomic_path(out / "anonymize_scaling.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(doc, out / "anonymize_scaling.png")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for r in doc["results"]:
        rows = [x for x in r["rows"] if x["runner"] == "ray"]
        ws = [x["workers"] for x in rows]
        line, = ax.plot(ws, [x["vs_local"] for x in rows], "o-", label=f"{r['label']}: end to end")
        ax.plot(ws, [x["steady_vs_local"] for x in rows], "s--", color=line.get_color(), label=f"{r['label']}: steady")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="k", lw=0.8, ls=":")
    ax.set_xticks([1, 2])
    ax.set_xlabel("Ray workers (CPU actors)")
    ax.set_ylabel("throughput / single-process runner")
    ax.set_title(f"measured, 2 CPU cores shared (load {doc['load_average_after'][0] if doc['load_average_after'] else '?'})")
    ax.legend(fontsize=6)
    ax = axes[1]
    rows = doc["projection_sd15_h100"]["rows"]
    ax.loglog([x["gpus"] for x in rows], [x["ideal_img_s"] for x in rows], "k:", label="ideal (8 img/s per GPU)")
    ax.loglog([x["gpus"] for x in rows], [x["modeled_img_s"] for x in rows], "o-", label="modeled with measured overhead")
    ax.set_xlabel("H100 GPUs")
    ax.set_ylabel("images / s")
    ax.set_title("SD 1.5, 512 px: projection")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
