"""Training a small DeepLab v1 (LargeFOV topology, reduced width) on generated scenes, on the CPU.

The defaults are the bundled model's recipe (4,000 iterations of batch 12 at 161x161, width
0.125): ``train()`` with them gives the shipped weights bit for bit (checked on the project's 2-core
build machine; 28 minutes). Deterministic: scenes come from the scenes package with seeds
10,000,000 * seed + 0.. (the held-out scenes start at seed 1,000,000), and torch is seeded. Loss:
softmax cross-entropy on the align-corners upsampled scores, as the deployed pipeline sees them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scenes import CLASS_NAMES, make_scene

from .model import DeepLabPipeline, DeepLabV1, ModelConfig

#: Training seeds of one run: 10,000,000 * its seed + the scene's number.
SEEDS_PER_RUN = 10_000_000


def scene_crop(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A scene generated at a random scale (1x to 2x the crop) and randomly cropped to size x size,
    so the network sees objects over the range of sizes that deployment images have."""
    rng = np.random.default_rng([seed, 7])
    side = int(rng.integers(size, 2 * size + 1))
    image, labels = make_scene(seed, side, side)
    y, x = (int(v) for v in rng.integers(0, side - size + 1, size=2))
    return image[y:y + size, x:x + size], labels[y:y + size, x:x + size]


def batch(seeds, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x size x size x 3 uint8 BGR, labels N x size x size int64) of scene_crop per seed."""
    pairs = [scene_crop(int(s), size) for s in seeds]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return images, labels


def train(width: float = 0.125, iters: int = 4000, batch_size: int = 12, size: int = 161, lr: float = 2e-3,
          seed: int = 0, progress: bool = True) -> DeepLabV1:
    """A DeepLabV1 for the scenes' classes trained from scratch (AdamW, one-cycle schedule, every
    other batch mirrored); returned in eval mode. size: the crop side, of the form 8k+1."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    config = ModelConfig(num_classes=len(CLASS_NAMES), variant="largefov", width=width)
    net = DeepLabV1(config)
    # He initialisation: a 16-layer plain ReLU net without batch norm trains from scratch only
    # when the signal neither vanishes nor explodes through depth.
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.normal_(net.fc8.weight, std=0.01)
    pipe = DeepLabPipeline(net).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters, pct_start=0.1)
    # Class weights counter the dominance of background pixels.
    weight = torch.tensor([0.5] + [1.0] * (len(CLASS_NAMES) - 1))
    bar = tqdm(range(iters), desc="train", unit="it", disable=not progress)
    ema = None
    for it in bar:
        seeds = np.arange(it * batch_size, (it + 1) * batch_size) + seed * SEEDS_PER_RUN
        images, labels = batch(seeds, size)
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
    return net.eval()
