"""Large-batch training wired into the engines (issue 18): the tiled loss (train.loss_tile) through GradCache
and both engines equals the untiled loss, LARS/LAMB step on both engines (DeepSpeed only at ZeRO 0 in fp32),
lr scaling and warmup keys, defaults that leave every earlier train stage and schedule as it was, and a
SIGKILLed tiled + LAMB training that resumes to the uninterrupted run's weights."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from anonrisk.attack.engine import build_engine, contrastive_step
from anonrisk.attack.train import lr_at, lr_schedule
from anonrisk.attack.train_plan import validate_plan
from anonrisk.config import load_config
from anonrisk.config.schema import TrainConfig
from anonrisk.errors import ConfigError
from tests.process_helpers import sigkill_at_first_checkpoint

TINY = dict(backbone="test_convnext", input="rgb", embed_dim=16, batch_size=8)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def cfg_of(**kw):
    return TrainConfig(**{**TINY, **kw})


# ---- defaults change nothing -------------------------------------------------------------------------------
def old_lr_at(step, cfg):
    """The schedule of every run before issue 18 (anonrisk/attack/train.py at TRAIN_VERSION 2), verbatim."""
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def test_the_default_schedule_is_the_old_one_bit_for_bit():
    for lr, steps, batch in ((0.003, 240, 64), (1e-3, 200, 64), (0.0123, 7, 16), (0.5, 1, 8), (3e-4, 1000, 4096)):
        cfg = cfg_of(lr=lr, steps=steps, batch_size=batch)
        assert [lr_at(s, cfg) for s in range(steps)] == [old_lr_at(s, cfg) for s in range(steps)], (lr, steps)


def test_lr_scaling_and_warmup_keys():
    cfg = cfg_of(lr=0.01, steps=100, batch_size=1024, lr_scaling="sqrt", lr_base_batch=256, warmup_steps=10)
    s = lr_schedule(cfg)
    assert s.peak_lr == pytest.approx(0.02) and s.warmup_steps == 10
    assert lr_at(0, cfg) == pytest.approx(0.002) and lr_at(9, cfg) == pytest.approx(0.02) and lr_at(99, cfg) < 1e-4
    assert lr_schedule(cfg.model_copy(update={"lr_scaling": "linear"})).peak_lr == pytest.approx(0.04)
    assert lr_at(0, cfg.model_copy(update={"warmup_steps": 0})) == pytest.approx(0.02)  # no warmup: the peak at once
    with pytest.raises(ConfigError, match=r"train.warmup_steps=101 is more than train.steps=100"):
        validate_plan(cfg.model_copy(update={"warmup_steps": 101}), "cpu")


def test_new_keys_at_their_defaults_keep_every_train_fingerprint():
    """The quickstart's train stages keep their directories: the fingerprint hashes exactly the dict it hashed
    before the keys existed, and only a setting that changes training makes a new one."""
    from anonrisk.attack.train import TRAIN_VERSION
    from anonrisk.plan import plan
    from anonrisk.stages import fingerprint

    new_keys = {"trust_coefficient", "lr_scaling", "lr_base_batch", "warmup_steps", "loss_tile"}

    def train_fps(*overrides):
        p = plan(load_config("configs/quickstart.yaml", list(overrides)))
        return {(t, a): p.targets[t].attacks[a].train.fingerprint for t in p.targets for a in p.targets[t].attacks
                if p.targets[t].attacks[a].train}

    base = plan(load_config("configs/quickstart.yaml"))
    for t in base.targets.values():
        for a in t.trained():
            before = a.train_config.model_dump(exclude={"device", "checkpoint_every", *new_keys})
            old = fingerprint("train", TRAIN_VERSION, before, t.data.fingerprint, t.anonymize.fingerprint, 64)
            assert a.train.fingerprint.endswith(old), (t.name, a.name)
    fps = train_fps()
    explicit = ["train.loss_tile=null", "train.lr_scaling=none", "train.warmup_steps=null", "train.trust_coefficient=0.001",
                "train.lr_base_batch=4096"]  # lr_base_batch does nothing without lr_scaling
    assert train_fps(*explicit) == fps
    assert train_fps("train.trust_coefficient=0.02") == fps  # LARS only
    for changes in (["train.loss_tile=16"], ["train.optimizer=lamb"], ["train.warmup_steps=3"],
                    ["train.lr_scaling=sqrt"], ["train.optimizer=lars", "train.trust_coefficient=0.02"]):
        changed = train_fps(*changes)
        assert all(changed[k] != fps[k] for k in fps), changes


# ---- the tiled loss and the large-batch optimizers through the engines --------------------------------
def run_steps(cfg, labels=LABELS, steps=3):
    engine, _ = build_engine(cfg, "cpu")
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        anon, orig = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
        losses.append(contrastive_step(engine, anon, orig, labels).item())
        engine.step(cfg.lr)
    return losses, engine.export()


def assert_close(got, ref, tol=1e-5):
    (losses, w), (ref_losses, ref_w) = got, ref
    assert ref_losses[0] != ref_losses[-1]  # it trained
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < tol, (losses, ref_losses)
    worst = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
    assert worst < tol, worst


@pytest.mark.parametrize("labels", [LABELS, None], ids=["identity", "pair"])
def test_tiled_loss_through_both_engines_and_grad_cache_equals_the_untiled_loss(labels, dist_group):
    """Tiles of 3 over 8 rows (ragged), alone and under GradCache chunks of 2 (row blocks of 2), on the torch
    engine and DeepSpeed ZeRO 2; SGD, learnable temperature (its gradient comes through the tiles too)."""
    common = dict(optimizer="sgd", lr=0.1, learn_temperature=True)
    ref = run_steps(cfg_of(**common), labels)
    for kw in (dict(loss_tile=3), dict(loss_tile=3, grad_cache_chunk=2), dict(loss_tile=1, grad_cache_chunk=4),
               dict(engine="deepspeed", zero_stage=2, loss_tile=3, grad_cache_chunk=2)):
        assert_close(run_steps(cfg_of(**common, **kw), labels), ref)


def test_lars_and_lamb_step_on_both_engines_alike(dist_group):
    """The torch engine steps anonrisk's LARS/LAMB; DeepSpeed at ZeRO 0 in fp32 is handed the same optimizer
    (not its config's AdamW) and trains to the same weights (bit for bit here; 1e-6 allowed), with the tiled
    loss on both. Engines are compared at the same tile: tiled vs untiled differ by float rounding (1e-7 in
    the loss), which LAMB's per-element normalisation of near-zero gradients amplifies to ~3e-4 in 3 steps
    (SGD keeps it under 1e-5: the test above)."""
    from anonrisk.attack.optim import LAMB, LARS

    for name, cls, kw in (("lars", LARS, dict(lr=2.0, trust_coefficient=0.01)), ("lamb", LAMB, dict(lr=0.05))):
        torch_engine, _ = build_engine(cfg_of(optimizer=name, **kw), "cpu")
        assert type(torch_engine.opt) is cls and [g["adapt"] for g in torch_engine.opt.param_groups] == [True, False]
        ds_engine, plan = build_engine(cfg_of(optimizer=name, engine="deepspeed", zero_stage=0, **kw), "cpu")
        assert type(ds_engine.ds.optimizer) is cls and "optimizer" not in plan.ds_config
        ref = run_steps(cfg_of(optimizer=name, loss_tile=3, **kw))
        assert_close(run_steps(cfg_of(optimizer=name, engine="deepspeed", zero_stage=0, loss_tile=3, **kw)), ref, tol=1e-6)
        if name == "lars":  # the trust coefficient reaches the optimizer: another value, another model
            other = run_steps(cfg_of(optimizer=name, loss_tile=3, **{**kw, "trust_coefficient": 0.001}))
            assert max((other[1][k] - ref[1][k]).abs().max().item() for k in ref[1]) > 1e-3


def test_deepspeed_refuses_lars_and_lamb_where_it_steps_flattened_partitions():
    for opt in ("lars", "lamb"):
        for kw, got in ((dict(zero_stage=2), "ZeRO 2, fp32"), (dict(zero_stage=1), "ZeRO 1, fp32"),
                        (dict(zero_stage=0, precision="bf16"), "ZeRO 0, bf16"), ({}, "ZeRO 2, fp32")):
            with pytest.raises(ConfigError, match=rf"train.optimizer={opt} with train.engine=deepspeed needs "
                                                  rf"train.zero_stage=0 and train.precision=fp32 \(got {got}\)"):
                validate_plan(cfg_of(optimizer=opt, engine="deepspeed", **kw), "cpu")
        assert validate_plan(cfg_of(optimizer=opt, engine="deepspeed", zero_stage=0), "cpu").zero_stage == 0
        assert validate_plan(cfg_of(optimizer=opt, precision="bf16"), "cpu").engine == "torch"  # torch: any precision


def test_cli_names_the_key_for_a_bad_large_batch_setting(tmp_path, capsys):
    from anonrisk.cli import main

    rc = main(["train", "configs/quickstart.yaml", f"runs_dir={tmp_path}/runs", "train.optimizer=lamb", "train.engine=deepspeed"])
    assert rc == 2 and "train.optimizer=lamb with train.engine=deepspeed needs train.zero_stage=0" in capsys.readouterr().err
    rc = main(["train", "configs/quickstart.yaml", f"runs_dir={tmp_path}/runs", "train.loss_tile=0"])
    assert rc == 2 and "train.loss_tile" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---- kill and resume ----------------------------------------------------------------------------------------
def train_cmd(tmp):
    return [sys.executable, "-m", "anonrisk", "train", "configs/quickstart.yaml", f"runs_dir={tmp}/runs", f"results_dir={tmp}/results",
            "anonymizers=[blur]", "train.optimizer=lamb", "train.lr=0.01", "train.loss_tile=5", "train.grad_cache_chunk=8",
            "train.steps=16", "train.checkpoint_every=3", "train.batch_size=16", "train.warmup_steps=4",
            "data.synthetic.identities=24", "data.image_size=32", "progress=false", "tracking.mlflow=false"]


@pytest.mark.slow
def test_killed_tiled_lamb_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL after the first checkpoint, rerun: the LAMB moments and step counts come back from the
    checkpoint, the tiled GradCache step continues with the same data and lr, and the weights and the loss
    log equal the uninterrupted run's exactly."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    ref = subprocess.run(train_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    stage = sigkill_at_first_checkpoint(train_cmd(tmp_path / "killed"), env, tmp_path / "killed" / "runs", timeout=240)
    resumed = subprocess.run(train_cmd(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_stage = next((tmp_path / "ref" / "runs" / "train").glob("*/"))
    assert ref_stage.name == stage.name and 3 <= json.loads((stage / "DONE").read_text())["resumed_from"] < 16
    train = json.loads((stage / "config.json").read_text())["train"]
    assert (train["optimizer"], train["loss_tile"], train["grad_cache_chunk"]) == ("lamb", 5, 8)
    from safetensors.torch import load_file

    a, b = load_file(str(ref_stage / "encoder.safetensors")), load_file(str(stage / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ref_stage / "log.jsonl").read_text() == (stage / "log.jsonl").read_text()
