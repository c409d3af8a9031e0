"""What one grid job runs: a stage of one cell (through the pipeline's idempotent stage methods) or the
final collect. Jobs are submitit ``Checkpointable``: on a time limit or preemption signal (USR2) submitit
requeues the same call, and since every stage keeps its progress on disk (shard markers, training
checkpoints), the requeued job resumes where the first one stopped.

Training additionally stops at a step boundary with a fresh checkpoint before the requeue: USR2 is routed
to the trainer's stop handler (SIGUSR1), and the requeue happens once training has raised ``Preempted``.
An external ``scontrol requeue`` (SIGTERM) reaches the trainer directly; Slurm requeues the job itself.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Any, Iterator, Optional

import submitit

log = logging.getLogger("anonrisk")


@contextlib.contextmanager
def usr2_checkpoints_training() -> Iterator[None]:
    """Inside a submitit job: USR2 first asks a running training loop to checkpoint and stop, then lets
    submitit's own handler requeue the job. Outside training, submitit's handler runs at once."""
    submitit_handler = signal.getsignal(signal.SIGUSR2)
    asked = {"training": False}

    def on_usr2(signum, frame):
        trainer = signal.getsignal(signal.SIGUSR1)
        if callable(trainer):  # the trainer's StopFlag is installed: stop at the next step boundary
            asked["training"] = True
            trainer(signum, frame)
        elif callable(submitit_handler):
            submitit_handler(signum, frame)

    signal.signal(signal.SIGUSR2, on_usr2)
    try:
        yield
    except BaseException as exc:
        from anonrisk.attack.train import Preempted

        if isinstance(exc, Preempted) and asked["training"] and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + exit
        raise
    finally:
        signal.signal(signal.SIGUSR2, submitit_handler)


def run_stage(stage: str, cell_cfg: dict, grid_dir: str, cell_id: str, cells: list[str], attack: Optional[str] = None) -> dict:
    """One node of a cell's plan; ``attack`` names a train node's attack (as the cell's config calls it)."""
    from anonrisk.config.schema import RunConfig
    from anonrisk.pipeline import Pipeline
    from anonrisk.stages import read_json
    from anonrisk.tracking import grid_mlflow

    cfg = RunConfig.model_validate(cell_cfg)
    cfg.progress = False
    pipe = Pipeline(cfg)
    target = pipe.target(cfg.anonymizers[0])
    if stage == "prepare":
        return {"stage": stage, "path": str(pipe.prepare().path), "records": len(pipe.records)}
    if stage == "anonymize":
        return {"stage": stage, "path": str(pipe.anonymize(target).path)}
    if stage == "train":
        import torch.distributed as dist

        from anonrisk.attack.dist import leave_process_group, read_env
        from anonrisk.tracking.steps import train_metric_names

        had_group = dist.is_available() and dist.is_initialized()  # a caller's group (debug executor, tests) stays

        # one rank logs (16 ranks writing one run, or one sqlite file, race): live, to every cell it serves.
        # The launcher's rank: the process group does not exist yet (every rank would read rank 0 from it)
        names = train_metric_names(attack, len(target.trained()) > 1)
        loggers = grid_mlflow.training_loggers(Path(grid_dir), cells, names) if read_env().rank == 0 else []
        pipe.on_train_step = grid_mlflow.on_step(loggers)
        path = pipe.train(target, attack).path  # every task of a multi-task job is one training rank
        for logger in loggers:  # the rest, and every step a reused or resumed training ran before
            logger.close(path / "log.jsonl")
        if not had_group:
            leave_process_group()  # the job's processes exit next
        return {"stage": stage, "path": str(path)}
    if stage == "evaluate":
        from anonrisk.stages import write_json

        out = target.cell
        with out.lock():
            if not out.reuse(["result.json"]):
                out.begin({"config": cfg.model_dump(mode="json"), "fingerprints": target.fingerprints()})
                pipe.prepare()
                card = pipe.report_card(target, pipe.validate_attacks())
                write_json(out / "result.json", card)
                out.mark_done({"attacks": sorted(card["attacks"])}, outputs=["result.json"])
        result = read_json(out / "result.json")
        for cid in cells:
            grid_mlflow.log_cell(Path(grid_dir), cid, result)
        return {"stage": stage, "path": str(out.path)}
    raise ValueError(f"unknown stage {stage!r}")


class StageJob(submitit.helpers.Checkpointable):
    """One node of the stage graph. ``checkpoint`` (inherited) resubmits the same call on requeue."""

    def __call__(self, stage: str, cell_cfg: dict, grid_dir: str, cell_id: str, cells: Optional[list[str]] = None,
                 attack: Optional[str] = None) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        with usr2_checkpoints_training():
            return run_stage(stage, cell_cfg, grid_dir, cell_id, cells or [cell_id], attack)


class CollectJob(submitit.helpers.Checkpointable):
    """Gather every cell's results into results/<grid>/ and MLflow once the evaluate stages are over."""

    def __call__(self, grid_path: str, overrides: dict[str, Any]) -> dict:
        from anonrisk.launch.collect import collect
        from anonrisk.launch.grid import plan_grid

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return collect(plan_grid(grid_path, overrides, check=False), strict=True)
