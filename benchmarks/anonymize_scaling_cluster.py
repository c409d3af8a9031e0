"""What limits the Ray runner at cluster size: 16 to 64 fake-GPU actors on Ray's fake autoscaling cluster.

    python benchmarks/anonymize_scaling_cluster.py                      # pools of 16, 32, 64 actors
    python benchmarks/anonymize_scaling_cluster.py --actors 16 --shards-per-actor 4   # a quick check

The cluster is the one tests/test_ray_autoscale.py uses (a head without GPU, the autoscaler's fake
multi-node provider starting ``gpu_worker`` nodes with ``--gpus-per-node`` fake GPUs each), booted to full
size once (``ray.autoscaler.sdk.request_resources``; the boot time is reported) so that each run measures the
runner, not node starts. Each actor holds one fake GPU and runs a deliberately cheap anonymizer (identity on
small images), so what is measured is the runner's and Ray's own cost:

- the driver's CPU per shard (``driver_cpu_seconds`` / shards),
- Ray's cost per shard: the CPU time of the whole cluster (every process in the head's process group: GCS,
  raylets, actors, decode tasks) from the first output to the end (actor start and model setup are before it)
  outside the actors' ``run_shard``, per shard. The wall-clock figure beside it
  (actor-seconds from the first output to the end outside ``run_shard``) is reported too, but with 16-64
  actors on a few cores it mostly measures waiting for a CPU,
- the time to the first actor ready and to the first output as the pool grows.

With these costs the projection of N GPUs x 8 img/s (SD 1.5 at 512 px on H100s) is recomputed and the
smallest shard size that keeps efficiency >= 95 % at 64 GPUs is stated; ``benchmarks/anonymize_scaling.py
--reproject`` then uses them in results/benchmarks/anonymize_scaling.md. Results:
``results/benchmarks/anonymize_scaling_cluster.{json,md}``. The outputs of every run are checked complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.anonymize_scaling import SD15_IMG_PER_S_PER_H100, load_avg, png_write_seconds, projection  # noqa: E402

SHARD_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--actors", default="16,32,64", help="pool sizes, one run each")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--shards-per-actor", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    return ap.parse_args(argv)


def boot(ray, gpus: int, timeout: float = 900) -> float:
    """Ask the autoscaler for ``gpus`` GPUs (public API) and wait until the nodes are up; seconds."""
    from ray.autoscaler.sdk import request_resources

    t0 = time.perf_counter()
    request_resources(bundles=[{"GPU": 1}] * gpus)
    while ray.cluster_resources().get("GPU", 0) < gpus:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"the fake cluster reached {ray.cluster_resources().get('GPU', 0):g} of {gpus} GPUs in {timeout:g} s")
        time.sleep(0.5)
    return time.perf_counter() - t0


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of every process of the cluster (one process group: head, fake nodes, actors), reaped children
    included (a raylet's cutime/cstime holds its exited workers')."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(f[2]) == pgid:
                total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    return total / tick


def run(n: int, args, scratch: Path, pgid: int) -> dict:
    from anonrisk.anonymize import build_anonymizer
    from anonrisk.anonymize.ray_runner import anonymize_ray
    from anonrisk.anonymize.runner import AnonymizeJob
    from anonrisk.config.schema import AnonymizeConfig, DataConfig, RayConfig, Spec
    from anonrisk.pipeline import prepare_data as prepare
    from anonrisk.plan import anonymize_fingerprint
    from anonrisk.stages import StageDir, read_json

    records_n = n * args.shards_per_actor * args.shard_size
    data = DataConfig(image_size=args.image_size, synthetic={"identities": math.ceil(records_n / 8), "images_per_identity": 8})
    data_stage, records = prepare(data, str(scratch / f"data-{n}"), progress=False)
    records = records[:records_n]
    spec = Spec(name="identity", kind="identity")
    anonymizer = build_anonymizer(spec)
    cfg = AnonymizeConfig(runner="ray", device="cpu", shard_size=args.shard_size, batch_size=args.shard_size, write_threads=0,
                          ray=RayConfig(num_workers=n, num_gpus_per_worker=1, num_cpus_per_worker=0.5, decode="tasks",
                                        wait_for_workers_s=600))
    stage = StageDir(scratch / f"runs-{n}", "anonymize", data_stage.fingerprint, anonymize_fingerprint(anonymizer, args.image_size, 0))
    samples, stop, sampler_cpu = [], threading.Event(), [0.0]

    def sample():  # the cluster's CPU over time: the steady phase starts at the first output
        while not stop.is_set():
            samples.append((time.perf_counter(), group_cpu_seconds(pgid)))
            stop.wait(0.25)
        sampler_cpu[0] = time.thread_time()  # this thread's own CPU, not the driver's

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    try:
        anonymize_ray(AnonymizeJob(spec, anonymizer, records, stage, args.image_size, cfg, progress=False))
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    end_cpu = group_cpu_seconds(pgid)
    s = read_json(stage / "DONE")
    assert s["computed"] == records_n, s
    shards = s["shards_run"]
    first = t0 + s["first_output_seconds"]
    cpu_at_first = next((c for t, c in samples if t >= first), end_cpu)
    steady_cpu = end_cpu - cpu_at_first  # actor start and model setup are before it
    # steady phase: from the first output (Ray Data starts the stage once min_size actors are up) to the end
    steady = seconds - s["first_output_seconds"]
    busy = s["shard_seconds"]["mean"] * (shards - 1)
    row = {"actors": n, "nodes": s["nodes"], "records": records_n, "shards": shards, "seconds": seconds,
           "first_ready_seconds": s["first_ready_seconds"], "first_output_seconds": s["first_output_seconds"],
           "driver_cpu_seconds_per_shard": max(0.0, s["driver_cpu_seconds"] - sampler_cpu[0]) / shards,
           # wall: actor-seconds outside run_shard (on one oversubscribed machine: mostly waiting for a CPU)
           "ray_wall_seconds_per_shard": max(0.0, (n * steady - busy) / max(1, shards - 1)),
           # CPU: the whole cluster's CPU (raylets, GCS, actors, decode tasks) outside the actors' run_shard, per shard;
           # on a real cluster that is the cost that sits between an actor's shards
           "ray_seconds_per_shard": max(0.0, steady_cpu - s["shard_cpu_seconds"] * (shards - 1) / shards) / max(1, shards - 1),
           "cluster_cpu_seconds": end_cpu - samples[0][1] if samples else 0.0, "steady_cluster_cpu_seconds": steady_cpu,
           "shard_compute_seconds": s["shard_seconds"]["mean"],
           "workers_seen": s["workers"], "load_average": load_avg()}
    print(json.dumps(row), flush=True)
    shutil.rmtree(scratch / f"runs-{n}", ignore_errors=True)
    return row


def shard_size_for(efficiency: float, gpus: int, overhead: float, driver: float, write_s: float) -> dict:
    """The smallest shard size of SHARD_SIZES whose modeled efficiency at ``gpus`` GPUs reaches ``efficiency``."""
    table = []
    for size in SHARD_SIZES:
        row = projection(overhead, driver, write_s, shard_size=size, gpus=(gpus,))[0]
        table.append({"shard_size": size, "efficiency": row["efficiency"], "modeled_img_s": row["modeled_img_s"]})
    ok = [r["shard_size"] for r in table if r["efficiency"] >= efficiency]
    return {"gpus": gpus, "target": efficiency, "smallest_shard_size": ok[0] if ok else None, "table": table}


def costs(doc: dict) -> dict:
    """The projection's inputs from the largest pool (the costs there are the ones that grow with N)."""
    big = max(doc["rows"], key=lambda r: r["actors"])
    write_s = png_write_seconds()
    overhead, driver = big["ray_seconds_per_shard"], big["driver_cpu_seconds_per_shard"]
    return {"from_actors": big["actors"], "overhead_seconds_per_shard": overhead, "driver_cpu_seconds_per_shard": driver,
            "png_write_seconds_512px": write_s, "per_gpu_img_s": SD15_IMG_PER_S_PER_H100,
            "shard_size_for_95_at_64": shard_size_for(0.95, 64, overhead, driver, write_s),
            "rows_256": projection(overhead, driver, write_s, shard_size=256)}


def write(doc: dict, out: Path) -> None:
    from anonrisk.stages import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "anonymize_scaling_cluster.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    c = doc["costs"]
    s95 = c["shard_size_for_95_at_64"]
    lines = ["# Anonymize stage at cluster size: fake-GPU actors on Ray's fake autoscaling cluster", "",
             "Written by `benchmarks/anonymize_scaling_cluster.py`. Each actor holds one fake GPU and runs the identity "
             "anonymizer on small images, so the times are the runner's and Ray's own. The cluster was booted to full size "
             f"once ({doc['boot_seconds']:.1f} s for {doc['gpus']} fake GPUs on {doc['nodes']} nodes) before the timed runs.", "",
             f"{doc['when']}; {doc['host']}; Ray {doc['ray_version']}; load average after {doc['load_average_after']}.", "",
             "| actors | nodes | shards | s | first actor ready s | first output s | driver CPU ms/shard | Ray CPU ms/shard | "
             "Ray wall ms/shard (oversubscribed) | shard compute ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['actors']} | {r['nodes']} | {r['shards']} | {r['seconds']:.1f} | {r['first_ready_seconds']:.1f} | "
                     f"{r['first_output_seconds']:.1f} | {r['driver_cpu_seconds_per_shard'] * 1000:.1f} | "
                     f"{r['ray_seconds_per_shard'] * 1000:.1f} | {r['ray_wall_seconds_per_shard'] * 1000:.1f} | "
                     f"{r['shard_compute_seconds'] * 1000:.1f} |")
    lines += ["", "`Ray CPU ms/shard`: the cluster's CPU outside the actors' `run_shard`, per shard (used in the projection). "
              "`Ray wall ms/shard`: actor-seconds from the first output to the end outside `run_shard`, per shard; with many "
              "actors on a few cores it is mostly waiting for a CPU. `first output` grows with the pool: a fixed pool "
              "(`num_workers`, min = max) starts work only when all its actors are up; an autoscaling pool (`min_workers` 1) "
              "starts with the first.", "",
              f"## Projection with these costs (from {c['from_actors']} actors): SD 1.5 at 512 px, {c['per_gpu_img_s']:g} img/s per GPU", "",
              f"Ray {c['overhead_seconds_per_shard'] * 1000:.1f} ms and driver CPU {c['driver_cpu_seconds_per_shard'] * 1000:.1f} ms "
              f"per shard, PNG write {c['png_write_seconds_512px'] * 1000:.1f} ms per image (2 writer threads). "
              f"**Smallest shard size with efficiency >= 95 % at 64 GPUs: {s95['smallest_shard_size']}.**", "",
              "| shard size | efficiency at 64 GPUs | img/s |", "|---:|---:|---:|"]
    lines += [f"| {r['shard_size']} | {r['efficiency']:.3f} | {r['modeled_img_s']:.0f} |" for r in s95["table"]]
    lines += ["", "Shards of 256:", "", "| GPUs | ideal img/s | modeled img/s | efficiency |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['gpus']} | {r['ideal_img_s']:.0f} | {r['modeled_img_s']:.0f} | {r['efficiency']:.3f} |" for r in c["rows_256"]]
    with atomic_path(out / "anonymize_scaling_cluster.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from tests.ray_helpers import FAKE_CLUSTER_ENV, fake_autoscaling_config, start_head

    actors = sorted(int(a) for a in args.actors.split(","))
    nodes = math.ceil(max(actors) / args.gpus_per_node)
    config = lambda gcs: fake_autoscaling_config(gcs, nodes, gpus_per_node=args.gpus_per_node,  # noqa: E731
                                                 cpus_per_node=args.gpus_per_node, head_cpus=2)
    scratch = Path(tempfile.mkdtemp(prefix="anonrisk-scaling-cluster-"))
    rows = []
    try:
        with start_head(num_cpus=2, extra_env=FAKE_CLUSTER_ENV, config=config) as head:
            ray.init(address=head.gcs, log_to_driver=False)
            try:
                boot_s = boot(ray, nodes * args.gpus_per_node)
                for n in actors:
                    rows.append(run(n, args, scratch, head.pgid))
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "ray_version": ray.__version__, "boot_seconds": boot_s, "gpus": nodes * args.gpus_per_node, "nodes": nodes,
           "settings": vars(args), "rows": rows, "load_average_after": load_avg()}
    doc["costs"] = costs(doc)
    write(doc, Path(args.out))
    return doc


if __name__ == "__main__":
    main()
