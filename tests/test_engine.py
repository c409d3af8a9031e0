"""Training engines: refusals before training, torch == DeepSpeed (ZeRO 0-3, GradCache), bf16 on the CPU,
and a DeepSpeed training killed mid-run (SIGKILL) that resumes to the uninterrupted run's losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anonrisk.attack.engine import build_engine, contrastive_step, validate_plan
from anonrisk.config.schema import TrainConfig
from anonrisk.errors import ConfigError

TINY = dict(backbone="test_convnext", input="rgb+edges", embed_dim=16, batch_size=8)


def attack(**kw):
    return TrainConfig(**{**TINY, **kw})


# ---- refusals, before any model is built ------------------------------------------------------------
def test_fp16_on_cpu_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"train.precision=fp16 on the CPU.*bf16 or fp32"):
        validate_plan(attack(precision="fp16"), "cpu")
    with pytest.raises(ConfigError, match="fp16"):
        validate_plan(attack(precision="fp16", engine="deepspeed"), "cpu")
    assert validate_plan(attack(precision="bf16"), "cpu").precision == "bf16"


def test_batch_not_divisible_by_world_size_is_refused():
    with pytest.raises(ConfigError, match=r"train.batch_size=10 is not divisible by the world size 4"):
        validate_plan(attack(batch_size=10), "cpu", world_size=4)
    assert validate_plan(attack(batch_size=12), "cpu", world_size=4).per_rank_batch == 3


def test_grad_cache_chunk_must_divide_the_per_rank_batch():
    with pytest.raises(ConfigError, match=r"train.grad_cache_chunk=3 must divide the per-rank batch 8"):
        validate_plan(attack(grad_cache_chunk=3, batch_size=16), "cpu", world_size=2)
    assert validate_plan(attack(grad_cache_chunk=2, batch_size=16), "cpu", world_size=2).chunks == 4


def test_grad_cache_with_a_zero_stage_this_deepspeed_cannot_defer_is_refused(monkeypatch):
    """Stages 2/3 reduce inside every backward; without coalesce_grad_reduction (DeepSpeed < 0.19) GradCache
    is refused there, while stages 0/1 (reduction at the accumulation boundary) stay allowed."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert validate_plan(attack(engine="deepspeed", zero_stage=3, grad_cache_chunk=2), "cpu").zero_stage == 3
    monkeypatch.delattr(DeepSpeedEngine, "coalesce_grad_reduction")
    for stage in (2, 3):
        with pytest.raises(ConfigError, match=rf"grad_cache_chunk with ZeRO stage {stage} needs DeepSpeed's coalesce_grad_reduction"):
            validate_plan(attack(engine="deepspeed", zero_stage=stage, grad_cache_chunk=2), "cpu")
    assert validate_plan(attack(engine="deepspeed", zero_stage=1, grad_cache_chunk=2), "cpu").zero_stage == 1
    assert validate_plan(attack(engine="deepspeed", zero_stage=2), "cpu").chunk is None  # no GradCache: fine


def test_deepspeed_presets_and_bad_configs(tmp_path):
    plan = validate_plan(attack(engine="deepspeed", precision="bf16", lr=0.02, batch_size=16), "cpu", world_size=2)
    ds = plan.ds_config
    assert plan.zero_stage == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 8, 1)
    assert ds["optimizer"]["params"]["lr"] == 0.02 and ds["optimizer"]["params"]["torch_adam"] is True
    assert validate_plan(attack(engine="deepspeed", deepspeed="zero3"), "cpu").zero_stage == 3
    assert validate_plan(attack(engine="deepspeed", deepspeed="zero3", zero_stage=1), "cpu").zero_stage == 1
    with pytest.raises(ConfigError, match=r"no preset 'zero9'; presets: zero0, zero1, zero2, zero3"):
        validate_plan(attack(engine="deepspeed", deepspeed="zero9"), "cpu")
    bad = tmp_path / "gas.yaml"
    bad.write_text("zero_optimization: {stage: 1}\ngradient_accumulation_steps: 4\n")
    with pytest.raises(ConfigError, match=r"gas.yaml sets gradient_accumulation_steps=4"):
        validate_plan(attack(engine="deepspeed", deepspeed=str(bad)), "cpu")
    with pytest.raises(ConfigError, match="engine=deepspeed only"):
        validate_plan(attack(zero_stage=2), "cpu")


def test_cli_refuses_before_any_stage_runs(tmp_path, capsys):
    from anonrisk.cli import main

    rc = main(["train", "configs/quickstart.yaml", f"runs_dir={tmp_path}/runs", "train.precision=fp16", "train.device=cpu"])
    assert rc == 2 and "train.precision=fp16 on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing prepared, anonymized or trained


# ---- the engines agree ------------------------------------------------------------------------------
def run_steps(cfg, steps=3):
    engine, _ = build_engine(cfg, "cpu")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        anon, orig = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
        losses.append(contrastive_step(engine, anon, orig, labels).item())
        engine.step(0.01 * (step + 1))  # the schedule's lr, not attack.lr, must reach the optimizer
    return losses, engine.export()


@pytest.mark.slow
def test_deepspeed_zero_stages_and_grad_cache_match_the_torch_engine(dist_group):
    # AdamW divides by sqrt(v): it turns summation-order noise in near-zero gradients into full-size steps,
    # so chunked runs are compared under SGD, the unchunked ones under both optimizers
    for opt, cases in (("adamw", (dict(zero_stage=0), dict(zero_stage=2))),
                       ("sgd", (dict(zero_stage=1, grad_cache_chunk=2), dict(zero_stage=2, grad_cache_chunk=4),
                                dict(zero_stage=3, grad_cache_chunk=2)))):
        ref_losses, ref_w = run_steps(attack(optimizer=opt, lr=0.5))
        assert ref_losses[0] != ref_losses[-1]
        for kw in cases:
            losses, w = run_steps(attack(engine="deepspeed", optimizer=opt, lr=0.5, **kw))
            assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, (opt, kw, losses, ref_losses)
            assert max((w[k] - ref_w[k]).abs().max().item() for k in ref_w) < 1e-5, (opt, kw)


def test_deepspeed_steps_the_same_adamw_as_the_torch_engine(dist_group, monkeypatch):
    """Like with like: DeepSpeed's presets build torch.optim.AdamW (torch_adam) with the torch engine's
    settings, fused exactly where the torch engine fuses it (CUDA). The CUDA choice is checked here by
    forcing it: torch 2.14 also runs fused AdamW on the CPU, and DeepSpeed must pass ``fused`` through."""
    from anonrisk.attack import torch_engine as torch_engine_module, train_plan
    from anonrisk.attack.train_plan import deepspeed_config

    cfg = attack(engine="deepspeed")
    assert deepspeed_config(cfg, 8, 1, "cuda")["optimizer"]["params"]["fused"] is True
    assert deepspeed_config(cfg, 8, 1, "cpu")["optimizer"]["params"]["fused"] is False
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable")
    for fused in (False, True):
        for module in (train_plan, torch_engine_module):  # the DeepSpeed config's choice and the torch engine's
            monkeypatch.setattr(module, "fused_adamw", lambda device, fused=fused: fused)
        torch_engine, _ = build_engine(attack(), "cpu")
        for stage in (0, 2):
            ds_engine, _ = build_engine(attack(engine="deepspeed", zero_stage=stage), "cpu")
            inner = ds_engine.ds.basic_optimizer  # under ZeRO's partitioning wrapper
            assert type(inner) is type(torch_engine.opt) is torch.optim.AdamW
            assert bool(inner.defaults["fused"]) is bool(torch_engine.opt.defaults["fused"]) is fused
            assert {k: inner.defaults[k] for k in keys} == {k: torch_engine.opt.defaults[k] for k in keys}
    # and the fused pair trains alike (what a GPU run compares)
    ref_losses, ref_w = run_steps(attack(lr=0.5))
    losses, w = run_steps(attack(engine="deepspeed", zero_stage=2, lr=0.5))
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5
    assert max((w[k] - ref_w[k]).abs().max().item() for k in ref_w) < 1e-5


def test_bf16_trains_on_the_cpu_with_both_engines(dist_group):
    fp32, _ = run_steps(attack(), steps=1)
    for engine in ("torch", "deepspeed"):
        losses, w = run_steps(attack(engine=engine, precision="bf16"), steps=2)
        assert abs(losses[0] - fp32[0]) < 0.05 and all(v.dtype == torch.float32 for v in w.values()), engine


# ---- kill and resume --------------------------------------------------------------------------------
def train_cmd(tmp):
    return [sys.executable, "-m", "anonrisk", "train", "configs/quickstart.yaml", f"runs_dir={tmp}/runs", f"results_dir={tmp}/results",
            "anonymizers=[blur]", "attack.engine=deepspeed", "attack.zero_stage=2", "attack.grad_cache_chunk=8",
            "attack.steps=24", "attack.checkpoint_every=4", "attack.batch_size=16", "data.synthetic.identities=30",
            "data.image_size=32", "progress=false"]


@pytest.mark.slow
def test_killed_deepspeed_training_resumes_with_the_same_next_loss(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    ref = subprocess.run(train_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_stage = next((tmp_path / "ref" / "runs" / "train").glob("*/"))
    assert json.loads((ref_stage / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 2

    proc = subprocess.Popen(train_cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer, deadline = None, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed" / "runs" / "train").glob("*/checkpoints/last.json"))
        if found:
            pointer = found[0]
            break
        time.sleep(0.05)
    assert pointer is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage = pointer.parent.parent
    assert stage.name == ref_stage.name and not (stage / "DONE").exists()

    resumed = subprocess.run(train_cmd(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = json.loads((stage / "DONE").read_text())["resumed_from"]
    assert 4 <= start < 24
    ref_log = (ref_stage / "log.jsonl").read_text().splitlines()
    log = (stage / "log.jsonl").read_text().splitlines()
    assert len(log) == 24 and log[start] == ref_log[start]  # the next loss after resuming, to 6 decimals
    assert log[-1] == ref_log[-1]
    from safetensors.torch import load_file

    a, b = load_file(str(ref_stage / "encoder.safetensors")), load_file(str(stage / "encoder.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    tags = [d.name for d in (stage / "checkpoints" / "deepspeed").iterdir() if d.is_dir()]
    assert tags == [json.loads((stage / "checkpoints" / "last.json").read_text())["tag"]]  # older tags removed
