"""Pretraining data-path throughput: CLEAR's slice store + batched tensor views, against a per-image
PIL/torchvision pipeline like the public code's (8-bit PNG -> RandomResizedCrop, ColorJitter, blur,
flip, ToTensor, Normalize; two views per image). Both single-threaded, so the figures are per CPU
core. Also the views/s of a full training step (CPU, MambaOut-T at 224). Prints JSON.

Usage: python benchmarks/pretrain_throughput.py [--slices 256] [--batch 64] [--train-steps 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torchvision import transforms

from clear_training.config import load_config
from clear_training.data import SliceRecord, SliceStore, SliceStoreWriter
from clear_training.pretrain import Trainer
from clear_training.views import SlicePyramid, ViewConfig, make_views
from CLEARLib.phantom import make_phantom


def public_code_pipeline(size: int):
    """MoCo v3's augmentation on PIL images, applied one image at a time."""
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(23, sigma=(0.1, 2.0))], p=1.0),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"threads": 1, "slices": args.slices, "view_size": args.size}
    volume, _ = make_phantom((args.slices, 512, 512), (0.7, 0.7, 1.5), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        writer = SliceStoreWriter(tmp / "store", size=512, shard_slices=128)
        records = [SliceRecord("case", "p", k, 1.5 * k, (0.7, 0.7, 1.5)) for k in range(args.slices)]
        writer.add_case(volume.hu, records)
        writer.close()
        pngs = []
        for k in range(args.slices):  # the public code reads 8-bit PNGs windowed beforehand
            windowed = np.clip((volume.hu[k].astype(np.float32) + 175) / 450, 0, 1) * 255
            path = tmp / f"{k:04d}.png"
            Image.fromarray(windowed.astype(np.uint8)).convert("RGB").save(path)
            pngs.append(path)

        store = SliceStore(tmp / "store")
        cfg = ViewConfig(size=args.size)
        bounds = torch.tensor([[-175.0, 275.0], [-1500.0, 500.0]])
        generator = torch.Generator().manual_seed(0)
        order = np.random.default_rng(0).permutation(args.slices)
        start = time.perf_counter()
        views = 0
        for i in range(0, args.slices, args.batch):
            rows = order[i : i + args.batch]
            pyramid = SlicePyramid(store.slices(rows))  # once per batch, shared by both views
            window = bounds[torch.randint(2, (len(rows),), generator=generator)]
            for _ in range(2):
                make_views(pyramid, window, cfg, generator)
                views += len(rows)
        ours = views / (time.perf_counter() - start)

        pipeline = public_code_pipeline(args.size)
        start = time.perf_counter()
        views = 0
        for k in order:
            with Image.open(pngs[k]) as image:
                image = image.convert("RGB")
                for _ in range(2):
                    pipeline(image)
                    views += 1
        pil = views / (time.perf_counter() - start)
        report["data_path_views_per_s_per_core"] = {
            "clear_store_batched_tensor_views": round(ours, 1),
            "public_code_pil_per_image": round(pil, 1),
            "ratio": round(ours / pil, 2),
        }

        torch.set_num_threads(torch.get_num_threads() if torch.get_num_threads() > 1 else 2)
        config = {
            "run": {
                "name": "bench",
                "out_dir": str(tmp / "run"),
                "epochs": 100,
                "warmup_epochs": 10,
                "max_steps": args.train_steps,
                "log_every_steps": 1000,
            },
            "data": {"store": str(tmp / "store"), "image_size": args.size},
            "model": {"encoder": "mambaout_tiny"},
            "method": {"name": "moco"},
            "optim": {"batch_size": args.train_batch},
        }
        (tmp / "bench.yaml").write_text(yaml.safe_dump(config))
        trainer = Trainer(load_config(tmp / "bench.yaml"))
        trainer.train_step()  # warm-up
        start = time.perf_counter()
        for _ in range(args.train_steps):
            trainer.train_step()
        seconds = time.perf_counter() - start
        report["training_step_cpu"] = {
            "encoder": "mambaout_tiny",
            "batch": args.train_batch,
            "threads": torch.get_num_threads(),
            "views_per_s": round(4 * args.train_batch * args.train_steps / seconds, 2),
            "seconds_per_step": round(seconds / args.train_steps, 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
