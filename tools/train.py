"""Train a small DeepLab v1 (same topology as LargeFOV, reduced width) on generated scenes, on the CPU.

    deeplab-train --out out/deeplab_shapes.safetensors
    python -m tools.train --iters 100 --out out/quick.safetensors

The defaults are the bundled model's recipe (4,000 iterations of batch 12 at 161x161): run as above,
it gives the shipped weights (models/deeplab_shapes.safetensors) bit for bit (checked on the
project's 2-core build machine; 28 minutes). The training itself is export/training.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import int_at_least, plain_warnings, refuse_unwritable, require_packages


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/deeplab_shapes.safetensors",
                    help="where to save the weights (default: %(default)s; the recipe reproduces models/deeplab_shapes.safetensors)")
    ap.add_argument("--width", type=float, default=0.125, help="channel width multiplier, in (0, 1]")
    ap.add_argument("--iters", type=int_at_least(1), default=4000)
    ap.add_argument("--batch", type=int_at_least(1), default=12)
    ap.add_argument("--size", type=int_at_least(9), default=161, help="training crop side (8k+1)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = default)")
    return ap


def main(argv=None) -> int:
    plain_warnings()
    ap = build_parser()
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

    from export.training import train
    from export.weights import save_checkpoint
    from scenes import CLASS_NAMES, PALETTE

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    net = train(args.width, args.iters, args.batch, args.size, args.lr, args.seed)
    try:
        save_checkpoint(net, args.out, class_names=CLASS_NAMES, palette=PALETTE)
    except OSError as e:  # checked before training, but the file system may still refuse (full, read-only)
        print(f"error: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB) after {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
