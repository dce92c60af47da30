"""Multi-node training on one machine: two torchrun agents ("nodes", one CPU worker each) with a c10d
rendezvous over loopback and gloo, against one agent running both workers (one node, two processes).
Prints JSON.

Usage: python benchmarks/two_agents.py [--steps 30]

Reported: the wall time of each and how far their weights and losses part. Both have two ranks with the
same per-rank random draws, so a correct multi-node set-up gives the single node's run exactly. (One process
with the whole batch is not the same run: each rank draws its own views from (seed, epoch, step, rank).)
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from clear_training.data import prepare_ct
from CLEARLib.io import write_volume
from CLEARLib.phantom import make_phantom

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(folder: Path, store: Path, name: str, steps: int) -> Path:
    cfg = {
        "run": {"name": name, "out_dir": str(folder / name), "epochs": 100, "warmup_epochs": 1, "max_steps": steps,
                "log_every_steps": 1, "device": "cpu"},
        "data": {"store": str(store), "image_size": 32},
        "model": {"encoder": "mambaout_femto", "encoder_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
                  "dim": 8, "mlp_dim": 16, "mlp_norm": "none"},
        "method": {"name": "lecl", "lam": 1.0},
        "optim": {"lr": 0.05, "batch_size": 8, "weight_decay": 0.0},
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="clear-two-agents-"))
    rows = []
    for i in range(4):
        volume, _ = make_phantom((12, 48, 48), (4.0, 4.0, 5.0), seed=i)
        rows.append(f"{write_volume(volume, folder / f'c{i}.nrrd')}")
    (folder / "cohort.csv").write_text("path\n" + "\n".join(rows) + "\n")
    prepare_ct(folder / "cohort.csv", folder / "store", size=48)

    runs = {}
    for name, nnodes, nproc in (("two_agents", 2, 1), ("one_agent", 1, 2)):
        config = _config(folder, folder / "store", name, args.steps)
        port = _free_port()
        command = [str(BIN / "torchrun"), f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--max-restarts=0",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={name}",
                   str(BIN / "clear-train"), "-q", "pretrain", "--config", str(config)]  # fmt: skip
        started = time.perf_counter()
        agents = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for _ in range(nnodes)]  # fmt: skip
        errors = [agent.communicate()[1] for agent in agents]
        runs[name] = time.perf_counter() - started
        if any(agent.returncode for agent in agents):
            raise SystemExit(f"{name} failed:\n" + "\n".join(errors))

    two = torch.load(folder / "two_agents" / "last.pt", weights_only=True)
    one = torch.load(folder / "one_agent" / "last.pt", weights_only=True)
    weight_diff = max(
        float((two["state_dict"][k].float() - v.float()).abs().max()) for k, v in one["state_dict"].items()
    )
    losses = zip(_losses(folder / "two_agents"), _losses(folder / "one_agent"), strict=True)
    print(
        json.dumps(
            {
                "steps": args.steps,
                "two_agents_wall_s": round(runs["two_agents"], 1),
                "one_agent_two_workers_wall_s": round(runs["one_agent"], 1),
                "world_size": two["world_size"],
                "max_abs_weight_difference": weight_diff,
                "max_abs_loss_difference": max(abs(a - b) for a, b in losses),
                "note": "wall times include starting Python, torch and the rendezvous",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
