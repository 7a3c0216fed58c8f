#!/usr/bin/env python3
"""Train a small DeepLab v1 (same topology as LargeFOV, reduced width) on generated scenes, on the CPU.

    python tools/train.py --out models/deeplab_shapes.safetensors

The defaults are the bundled model's recipe (4,000 iterations of batch 12 at 161x161): run as above,
it gives the shipped weights bit for bit (checked on the project's 2-core build machine; 28 minutes).
Deterministic: scenes come from tools.scenes with seeds 0.. (the held-out set used by
tools/evaluate.py starts at seed 1,000,000), and torch is seeded. Loss: softmax cross-entropy on
the align-corners upsampled scores, as the deployed pipeline sees them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __package__:  # imported: tools.train from a checkout, deeplab_tools.train when installed
    from .cli import int_at_least, plain_warnings, refuse_unwritable, require_packages
    from .scenes import CLASS_NAMES, PALETTE, make_scene
else:  # run as a script: python tools/train.py
    from tools.cli import int_at_least, plain_warnings, refuse_unwritable, require_packages  # noqa: E402
    from tools.scenes import CLASS_NAMES, PALETTE, make_scene  # noqa: E402


def scene_crop(seed: int, size: int):
    """A scene generated at a random scale (1x to 2x the crop) and randomly cropped to size x size,
    so the network sees objects over the range of sizes that deployment images have."""
    rng = np.random.default_rng([seed, 7])
    side = int(rng.integers(size, 2 * size + 1))
    image, labels = make_scene(seed, side, side)
    y, x = (int(v) for v in rng.integers(0, side - size + 1, size=2))
    return image[y:y + size, x:x + size], labels[y:y + size, x:x + size]


def batch(seeds, size):
    import torch

    pairs = [scene_crop(int(s), size) for s in seeds]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return images, labels


def main(argv=None) -> int:
    plain_warnings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/deeplab_shapes.safetensors")
    ap.add_argument("--width", type=float, default=0.125, help="channel width multiplier, in (0, 1]")
    ap.add_argument("--iters", type=int_at_least(1), default=4000)
    ap.add_argument("--batch", type=int_at_least(1), default=12)
    ap.add_argument("--size", type=int_at_least(9), default=161, help="training crop side (8k+1)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    # Refused before training: a mistake found when saving would cost the whole run.
    if args.size % 8 != 1:
        ap.error(f"--size must be of the form 8k+1 (the network's stride is 8), got {args.size}")
    if not 0 < args.width <= 1:
        ap.error(f"--width must be in (0, 1], got {args.width}")
    if not args.lr > 0 or args.lr == float("inf"):
        ap.error(f"--lr must be a finite number > 0, got {args.lr}")
    refuse_unwritable(ap, {"--out": args.out})
    require_packages(ap, ("torch", "safetensors"), "training")
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from export.model import DeepLabPipeline, DeepLabV1, ModelConfig
    from export.weights import save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = ModelConfig(num_classes=len(CLASS_NAMES), variant="largefov", width=args.width)
    net = DeepLabV1(config)
    # He initialisation: a 16-layer plain ReLU net without batch norm trains from scratch only
    # when the signal neither vanishes nor explodes through depth.
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.normal_(net.fc8.weight, std=0.01)
    pipe = DeepLabPipeline(net).train()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iters, pct_start=0.1)
    # Class weights counter the dominance of background pixels.
    weight = torch.tensor([0.5] + [1.0] * (len(CLASS_NAMES) - 1))
    t0 = time.time()
    bar = tqdm(range(args.iters), desc="train", unit="it")
    ema = None
    for it in bar:
        seeds = np.arange(it * args.batch, (it + 1) * args.batch) + args.seed * 10_000_000
        images, labels = batch(seeds, args.size)
        if it % 2:  # mirroring, as DeepLab trained
            images, labels = images.flip(2), labels.flip(2)
        scores = pipe(images)
        loss = F.cross_entropy(scores, labels, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    try:
        save_checkpoint(net.eval(), args.out, class_names=CLASS_NAMES, palette=PALETTE)
    except OSError as e:  # checked before training, but the file system may still refuse (full, read-only)
        print(f"error: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB) after {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
