"""One rank of tests/test_device_discipline.py: ``python -m fakegpu.worker RANK WORLD PORT DIR``.

Trains the contrastive attack with ``train_attack`` on the ``fakegpu`` device inside a process group that
serves only that device (see ``fakegpu/__init__.py``); writes DIR/served.<rank>.json with the collectives
the group served."""

import json
import sys
from pathlib import Path

import torch


def main(rank: int, world: int, port: int, root: Path) -> None:
    torch.set_num_threads(1)
    import fakegpu
    from fakegpu.case import IMAGE_SIZE, attack_config, pairs

    fakegpu.init_group(rank, world, port)
    from anonrisk.attack.train import train_attack
    from anonrisk.stages import StageDir

    anon, orig = pairs(root)
    train_attack(attack_config(), anon, orig, IMAGE_SIZE, StageDir(str(root / "runs"), "train", "fakegpu"), device=fakegpu.DEVICE,
                 progress=False)
    (root / f"served.{rank}.json").write_text(json.dumps(dict(fakegpu.SERVED)))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
