"""Contrastive training throughput and memory: the anonrisk engines beside a bare PyTorch loop, untiled
and tiled loss (``train.loss_tile``, issue 18).

    python benchmarks/train_throughput.py --device cuda --backbone resnet50 --image-size 224 \
        --batch-sizes 256,512 --chunks none,256 --engines torch,deepspeed --zero-stages 0,2 --tiles none,8192 \
        --search-chunk 512 --max-batch 1048576 --search-start 16384   # the GPU figures (one H100/H200)
    python benchmarks/train_throughput.py --device cpu  # the CPU record at tiny size (test_convnext, 32 px)
    python benchmarks/gpu_cases_training.py             # one step at 1,048,576 pairs, R50 224 px (GPU)

Timing: all configurations of one batch size are built in one process and stepped round by round
(interleaved, so load from other processes falls on all alike); images/s from each one's median step time.
Peak memory: each configuration again in a fresh process of its own. Inputs are synthetic and already on
the device as uint8, made float inside the step on both sides (data loading is not measured). The configurations:
- ``bare``: the reference, written plainly: Encoder forward over [anonymized; originals], symmetric InfoNCE,
  backward, AdamW step (fused on CUDA); bf16 autocast + channels_last on CUDA, fp32 on the CPU.
- ``torch`` / ``deepspeed``: ``anonrisk.attack.engine`` (``build_engine`` + ``contrastive_step`` +
  ``step``), at each batch size, GradCache chunk (``none`` = whole batch) and ZeRO stage.
images/s counts both images of a pair. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the
CPU its counterpart, the peak of live heap bytes (glibc ``mallinfo2``) above the process's size once imports
are done, before the model is built (sampled every 2 ms or more); the peak resident set size is recorded beside it
(``PeakMemory`` says why the cap is not on RSS).
``--tiles``: each engine configuration also with the tiled loss (rows named ``... tiled``, ``vs untiled`` =
tiled / untiled img/s at the same engine, chunk and batch); ``none`` alone: untiled only.
Largest batch: doubling from ``--search-start`` until a step fails (CUDA out of memory) or, on the CPU,
its memory passes ``--memory-cap-gb`` (the worker stops itself there): bare, untiled GradCache and tiled
GradCache. The GradCache searches make their inputs per chunk from a seed (``streamed``, as a loader would:
a batch of 10^6 images never sits in memory), so what they measure is the model and the loss.
Results go to ``results/benchmarks/train_throughput.json`` (one entry per device/backbone/size) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--backbone", default=None, help="timm name (default: test_convnext on cpu, resnet50 on cuda)")
    ap.add_argument("--image-size", type=int, default=None, help="pixels (default 32 cpu, 224 cuda)")
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--batch-sizes", default=None, help="pairs per step, comma separated (default 16,64,256 cpu; 256,512 cuda)")
    ap.add_argument("--chunks", default=None, help="GradCache chunks in pairs, 'none' = whole batch (default none,16,64 cpu; none,128 cuda)")
    ap.add_argument("--engines", default="torch,deepspeed")
    ap.add_argument("--zero-stages", default="0,2,3", help="for the deepspeed engine")
    ap.add_argument("--tiles", default=None, help="loss tiles, 'none' = untiled (default none,<default_tile>)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds (default 7 cpu, 10 cuda)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2 cpu, 3 cuda)")
    ap.add_argument("--search-start", type=int, default=None, help="first batch of the largest-batch search (default 64 cpu, 1024 cuda)")
    ap.add_argument("--max-batch", type=int, default=None, help="stop the search here (default 262144 cpu, 1048576 cuda)")
    ap.add_argument("--search-chunk", type=int, default=None, help="GradCache chunk for the search (default 32 cpu, 512 cuda)")
    ap.add_argument("--search-timeout-s", type=float, default=3600, help="a search step running longer is not measured and ends the search")
    ap.add_argument("--memory-cap-gb", type=float, default=0.5, help="CPU: a step using more than this does not fit")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---- the worker: one configuration in its own process --------------------------------------------------
class PeakMemory:
    """Peak memory above the size at start, sampled every 2 ms (less often when a sample is slow): ``peak``
    live heap bytes (glibc ``mallinfo2``, in use + mmapped), the CPU counterpart of
    ``torch.cuda.max_memory_allocated``, and ``peak_rss``. The cap is on ``peak``: RSS also counts freed
    memory glibc keeps between small live blocks (16,384 tiled pairs: 0.40 GB RSS for 25 MB live, the
    per-chunk embeddings pinning freed activations). Past the cap (or 16x it in RSS, to spare the machine)
    the process exits with status 3: the step does not fit."""

    def __init__(self, cap_bytes: float | None):
        self.cap, self.peak, self.peak_rss, self._stop = cap_bytes, 0, 0, False
        self._mallinfo = _mallinfo2()
        self.base, self.base_rss = self._live(), self._rss()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _live(self) -> int:
        if self._mallinfo is None:  # not glibc >= 2.33: RSS is the only measure
            return self._rss()
        m = self._mallinfo()
        return m.uordblks + m.hblkhd

    def _run(self):
        while not self._stop:
            t0 = time.perf_counter()
            used, rss = self._live() - self.base, self._rss() - self.base_rss
            cost = time.perf_counter() - t0  # mallinfo2 walks the free lists under the arena lock: keep it under 5 %
            self.peak, self.peak_rss = max(self.peak, used), max(self.peak_rss, rss)
            if self.cap is not None and (used > self.cap or rss > 16 * self.cap):
                print(json.dumps({"fits": False, "peak_mem_gb": used / 2**30, "peak_rss_gb": rss / 2**30}), flush=True)
                os._exit(3)
            time.sleep(max(0.002, 20 * cost))


def _mallinfo2():
    """glibc's ``mallinfo2`` (sums every arena), or None where there is none."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Info
    return fn


def make_step(spec: dict, device):
    """A closure running one training step of the configuration in ``spec`` on fixed synthetic inputs."""
    import torch

    from anonrisk.attack.losses import contrastive_loss
    from anonrisk.attack.model import Encoder
    from anonrisk.config.schema import TrainConfig

    b, size = spec["batch"], spec["image_size"]
    labels = torch.arange(b, device=device)
    streamed = spec.get("inputs") == "streamed" and spec["kind"] != "bare"
    if streamed:  # rows without pixels (contrastive_step slices them); prepare makes each chunk from a seed
        anon = orig = torch.empty((b, 0), dtype=torch.uint8)
    else:  # uint8 images on the device, made float per step (bare) or per GradCache chunk (engines)
        g = torch.Generator(device="cpu").manual_seed(0)
        anon = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8).to(device)
        orig = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8).to(device)

    def prepare(x, rows, side):
        if not streamed:
            return Encoder.preprocess(x)
        g = torch.Generator(device=device).manual_seed(1_000_003 * side + rows.start)  # the same on the re-run
        n = min(rows.stop, b) - rows.start
        return Encoder.preprocess(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8, device=device))
    bf16 = spec["precision"] == "bf16"
    if spec["kind"] == "bare":
        torch.manual_seed(0)
        model = Encoder(spec["backbone"], spec["embed_dim"], input="rgb").to(device).train()
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        def step():
            x = Encoder.preprocess(torch.cat([anon, orig]))
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                emb = model(x)
            loss = contrastive_loss(emb[:b].float(), emb[b:].float(), 0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    from anonrisk.attack.engine import build_engine, contrastive_step

    cfg = TrainConfig(backbone=spec["backbone"], input="rgb", embed_dim=spec["embed_dim"], batch_size=b, lr=1e-4,
                       engine=spec["kind"], precision=spec["precision"], grad_cache_chunk=spec.get("chunk"),
                       zero_stage=spec.get("zero_stage"), freeze_bn=spec.get("chunk") is not None, loss_tile=spec.get("tile"))
    engine, _ = build_engine(cfg, str(device))

    def step():
        contrastive_step(engine, anon, orig, labels, prepare)
        engine.step(1e-4)

    return step


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_memory(spec: dict) -> dict:
    """Peak memory of one configuration (its own process): warm-up steps plus one measured step."""
    import torch

    device = torch.device(spec["device"])
    import timm  # noqa: F401  (imports and the process group are not the step's memory)

    import anonrisk.attack.engine  # noqa: F401

    if spec["kind"] == "deepspeed":
        from anonrisk.attack.dist import init_process_group

        init_process_group(always=True)
    monitor = PeakMemory(spec.get("cap_bytes")) if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = make_step(spec, device)
        t0 = time.perf_counter()
        for _ in range(1 + spec.get("warmup", 0)):
            step()
        _sync(device)
    except torch.OutOfMemoryError:
        return {"fits": False, "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        return {"fits": True, "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30, "seconds": seconds}
    return {"fits": True, "peak_mem_gb": monitor.peak / 2**30, "peak_rss_gb": monitor.peak_rss / 2**30, "seconds": seconds}


def worker_timing(spec: dict) -> dict:
    """Step times of several configurations in one process, interleaved round by round, so that load from
    other processes falls on all of them alike; images/s from each one's median step time."""
    import torch

    device = torch.device(spec["device"])
    steps = {}
    for c in spec["configs"]:
        try:
            steps[c["label"]] = make_step({**spec["common"], **c}, device)
        except torch.OutOfMemoryError:
            steps[c["label"]] = None
    times = {k: [] for k in steps}
    for _ in range(spec["warmup"]):
        for k, step in steps.items():
            if step:
                step()
    _sync(device)
    for _ in range(spec["rounds"]):
        for k, step in steps.items():
            if step is None:
                continue
            try:
                t0 = time.perf_counter()
                step()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
            except torch.OutOfMemoryError:
                steps[k] = None
    b = spec["common"]["batch"]
    return {k: ({"img_per_s": 2 * b / statistics.median(v), "step_s": statistics.median(v)} if v else {"fits": False})
            for k, v in times.items()}


def worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return worker_timing(spec) if spec.get("mode") == "timing" else worker_memory(spec)


def run_worker(spec: dict, timeout: float = 3600) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if spec["device"] == "cpu" else "cuda")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # killed: neither fits nor fails, it is not measured
        return {"fits": None, "timed_out_s": timeout}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"fits": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}


# ---- the driver --------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    cuda = args.device.startswith("cuda")
    backbone = args.backbone or ("resnet50" if cuda else "test_convnext")
    size = args.image_size or (224 if cuda else 32)
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    batches = [int(x) for x in (args.batch_sizes or ("256,512" if cuda else "16,64,256")).split(",")]
    chunks = [None if c == "none" else int(c) for c in (args.chunks or ("none,128" if cuda else "none,16,64")).split(",")]
    iters = args.iters if args.iters is not None else (10 if cuda else 7)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    base = {"device": args.device, "backbone": backbone, "image_size": size, "embed_dim": args.embed_dim,
            "precision": precision, "iters": iters, "warmup": warmup, "threads": args.threads}
    from anonrisk.attack.tiled import default_tile

    tile = default_tile(args.device)
    tiles = [None if t == "none" else int(t) for t in (args.tiles or f"none,{tile}").split(",")]
    tile = next((t for t in tiles if t), tile)  # the search's tile

    rows = []
    for b in batches:
        configs = [{"label": "bare", "kind": "bare", "chunk": None, "zero_stage": None}]
        for engine in args.engines.split(","):
            stages = [int(s) for s in args.zero_stages.split(",")] if engine == "deepspeed" else [None]
            for stage in stages:
                for chunk in chunks:
                    if chunk is not None and (chunk >= b or b % chunk):
                        continue
                    for t in tiles:
                        configs.append({"label": f"{engine}-z{stage}-c{chunk}-t{t}", "kind": engine, "chunk": chunk,
                                        "zero_stage": stage, "tile": t})
        timing = run_worker({"mode": "timing", "device": args.device, "threads": args.threads, "configs": configs,
                             "common": {**base, "batch": b}, "rounds": iters, "warmup": warmup})
        print(f"timing b={b}: {timing}", file=sys.stderr)
        bare_ips = timing.get("bare", {}).get("img_per_s")
        for c in configs:
            mem = run_worker({**base, **c, "batch": b, "warmup": 1})
            t = timing.get(c["label"], {})
            ips = t.get("img_per_s")
            untiled = timing.get(c["label"].rsplit("-t", 1)[0] + "-tNone", {}).get("img_per_s") if c.get("tile") else None
            rows.append({"engine": c["kind"] + (" tiled" if c.get("tile") else ""), "zero_stage": c["zero_stage"], "batch": b,
                         "chunk": c["chunk"], "tile": c.get("tile"), "fits": bool(ips) and mem.get("fits", False),
                         "img_per_s": ips, "step_s": t.get("step_s"), "peak_mem_gb": mem.get("peak_mem_gb"),
                         "vs_bare": ips / bare_ips if ips and bare_ips else None,
                         "vs_untiled": ips / untiled if ips and untiled else None,
                         **({"error": mem["error"]} if "error" in mem else {})})
            print(f"{c['label']} b={b}: {rows[-1]}", file=sys.stderr)

    search = {}
    if not args.skip_search:
        start = args.search_start or (1024 if cuda else 64)
        top = args.max_batch or (1048576 if cuda else 262144)
        chunk = args.search_chunk or (512 if cuda else 32)
        cap = None if cuda else args.memory_cap_gb * 2**30
        for label, engine_chunk, t in (("bare", None, None), ("gradcache", chunk, None), ("tiled gradcache", chunk, tile)):
            b, best, tried = start, None, []
            while b <= top:
                spec = {**base, "kind": "bare" if label == "bare" else "torch", "batch": b, "chunk": engine_chunk,
                        "tile": t, "inputs": "streamed", "warmup": 0, "cap_bytes": cap}
                r = run_worker(spec, timeout=args.search_timeout_s)
                tried.append({"batch": b, **r})
                print(f"search {label} b={b}: {r}", file=sys.stderr)
                if not r.get("fits"):
                    break
                best = b
                b *= 2
            search[label] = {"largest_batch": best, "chunk": engine_chunk, "tile": t, "tried": tried,
                             "capped_at_max": best == top or tried[-1].get("fits") is None}

    import torch

    key = f"{'cuda' if cuda else 'cpu'}-{backbone}-{size}px"
    dev_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {args.threads or torch.get_num_threads()} threads)"
    entry = {"device": dev_name, "backbone": backbone, "image_size": size, "precision": precision, "iters": iters, "warmup": warmup,
             "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "largest_batch": search,
             "memory_cap_gb": None if cuda else args.memory_cap_gb}
    try:
        import deepspeed

        entry["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "train_throughput.json"
    doc = json.loads(jpath.read_text()) if jpath.exists() else {}
    doc[key] = entry
    jpath.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / "train_throughput.md").write_text(render(doc))
    print(render({key: entry}))
    return 0


def _tried(t: dict) -> str:
    if t.get("fits") is None:
        return f"{t['batch']}: not measured (stopped after {t.get('timed_out_s', 0):.0f} s)"
    rss = f" (RSS {t['peak_rss_gb']:.2f})" if t.get("peak_rss_gb") is not None else ""
    return f"{t['batch']}: {t.get('peak_mem_gb', 0):.2f} GB{rss}"


def render(doc: dict) -> str:
    lines = ["# Contrastive training throughput", "",
             "Written by `benchmarks/train_throughput.py`: images/s (both images of a pair; all configurations of a "
             "batch size stepped round by round in one process, median step) and peak memory (each configuration in "
             "its own process), beside a bare PyTorch loop measured in the same run (`vs bare` = engine / bare at the "
             "same batch). `chunk` = GradCache pairs per chunk (- = whole batch); `tile` = rows per tile of the tiled loss "
             "(`vs untiled` = tiled / untiled img/s, same engine, chunk and batch). Untiled GradCache memory grows with the "
             "batch through the (N x N) similarity matrices of the loss; the tiled loss holds (tile x tile) blocks. "
             "CPU memory: peak live heap bytes (glibc mallinfo2, the counterpart of torch.cuda.max_memory_allocated; "
             "the cap applies to it), the peak resident set size in brackets.", ""]
    for key, e in sorted(doc.items()):
        lines += [f"## {key}: {e['device']}", "",
                  f"{e['time']}; torch {e['torch']}, deepspeed {e.get('deepspeed', '-')}; {e['backbone']} at {e['image_size']} px, "
                  f"{e['precision']}, {e['warmup']} warm-up + {e['iters']} timed rounds, interleaved (median step).", "",
                  "| engine | ZeRO | batch (pairs) | chunk | tile | img/s | vs bare | vs untiled | peak mem GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in e["rows"]:
            ips = f"{r['img_per_s']:.1f}" if r.get("img_per_s") else ("does not fit" if not r.get("fits") else "-")
            ratio, vs_untiled = (f"{r[k]:.2f}" if r.get(k) else "-" for k in ("vs_bare", "vs_untiled"))
            mem = f"{r['peak_mem_gb']:.3f}" if r.get("peak_mem_gb") is not None else "-"
            lines.append(f"| {r['engine']} | {'-' if r['zero_stage'] is None else r['zero_stage']} | {r['batch']} | "
                         f"{r['chunk'] or '-'} | {r.get('tile') or '-'} | {ips} | {ratio} | {vs_untiled} | {mem} |")
        if e.get("largest_batch"):
            cap = f" under a {e['memory_cap_gb']} GB cap" if e.get("memory_cap_gb") else ""
            lines += ["", f"Largest contrastive batch on one device{cap} (doubling search):", ""]
            for label, s in e["largest_batch"].items():
                more = " (larger sizes not measured)" if s["capped_at_max"] else ""
                mems = ", ".join(_tried(t) for t in s["tried"])
                what = ", ".join(f"{k} {s[k]}" for k in ("chunk", "tile") if s.get(k))
                lines.append(f"- {label}{f' ({what})' if what else ''}: **{s['largest_batch']} pairs**{more}; tried {mems}")
            untiled, tiled = (e["largest_batch"].get(k, {}) for k in ("gradcache", "tiled gradcache"))
            if untiled.get("largest_batch") and tiled.get("largest_batch") and not untiled["capped_at_max"]:
                at_least = "at least " if tiled["capped_at_max"] else ""
                lines += ["", f"Tiled / untiled GradCache largest batch: {at_least}**{tiled['largest_batch'] / untiled['largest_batch']:.0f}x**."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
