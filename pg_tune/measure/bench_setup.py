"""What both sides of ``pg_tune.measure.bench`` share: the data, the recipe, the base model, timing.

Both sides get the same random-weight model (a tiny preset of any family, built once per worker),
the same JPEG files and texts (prompt ~10 tokens, suffix ~20), batch size, precision, LoRA rank and
targets, optimizer (AdamW, grad clip 1.0) and DataLoader workers.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path


def make_samples(root: Path, count: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    from pg_tune.data.sample import Sample
    from pg_tune.models.tiny import WORDS

    rng = random.Random(seed)
    samples = []
    for i in range(count):
        path = root / f"img{i:03d}.jpg"
        if not path.exists():
            pixels = np.random.default_rng(i).integers(0, 255, (240 + 8 * (i % 5), 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        prefix = "answer en " + " ".join(rng.choice(WORDS) for _ in range(7))
        suffix = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 23)))
        samples.append(Sample(image=str(path), prefix=prefix, suffix=suffix, source=f"bench[{i}]"))
    return samples


def bench_recipe(args):
    from pg_tune.config.recipe import (
        DataConfig,
        FullConfig,
        LoraConfig,
        ModelConfig,
        PartialConfig,
        Recipe,
        TrainConfig,
    )

    return Recipe(
        output_dir=tempfile.mkdtemp(prefix="pg_tune_bench_"),
        model=ModelConfig(name_or_path=args.preset, dtype=args.dtype),
        method=args.method,
        lora=LoraConfig(
            r=args.lora_r,
            alpha=2 * args.lora_r,
            dropout=0.0,
            targets="attention_mlp",
            use_dora=args.use_dora,
            use_rslora=args.use_rslora,
        ),
        full=FullConfig(vision=args.full_vision),
        partial=PartialConfig(groups=args.partial_groups.split(",")),
        data=DataConfig(
            max_text_length=128,
            num_workers=args.num_workers,
            # File order, as the reference side reads the rows: both first losses are of one batch.
            shuffle=args.group_by_length,
            group_by_length=args.group_by_length,
            pad_to_multiple_of=getattr(args, "pad_to_multiple_of", DataConfig.pad_to_multiple_of),
            feature_cache=args.feature_cache,
        ),
        train=TrainConfig(
            batch_size=args.batch_size,
            lr=1e-4,
            warmup_ratio=0.0,
            optimizer=args.optimizer,
            compile=getattr(args, "compile", False),
        ),
    )


def base_model(args, device: str, family):
    """The same random-weight base for both sides, built once (model and processor), any family."""
    import torch

    from pg_tune.config.recipe import ModelConfig

    model = family.load_model(ModelConfig(name_or_path=args.preset, dtype="float32"))
    processor = family.load_processor(ModelConfig(name_or_path=args.preset))
    return model.to(device=device, dtype=getattr(torch, args.dtype)), processor


def first_loss_tolerance(dtype: str, vocab: int, loss: float) -> float:
    """How far apart two computations of one batch's mean token cross-entropy may be, from its size.

    fp32: the two sides sum each row's ``vocab`` logits in another order (a fused, chunked head vs the
    model's full logits): about sqrt(V)·eps of the scale each, 16x that (as ``tests/numerics.py``).
    bf16: the reference rounds every logit to bf16 before the loss (pg_tune keeps them fp32), which
    moves a row's log-sum-exp and target logit by up to an ulp of bf16 each: 2 x eps_bf16 of the scale.
    The scale is the loss itself, at least 1.
    """
    import math

    import torch

    if dtype == "bfloat16":
        rel = 2 * torch.finfo(torch.bfloat16).eps
    else:
        rel = 16 * math.sqrt(vocab) * torch.finfo(torch.float32).eps
    return rel * max(abs(loss), 1.0)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def step_mark(device: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds, all threads) at a step boundary. On a machine
    other jobs share, CPU seconds per step measure the step's work; wall seconds include waiting."""
    sync(device)
    return time.perf_counter(), time.process_time()


def shape_of(batch) -> tuple[int, int, int, int]:
    """(non-padding tokens, longest row, supervised positions, image encoder passes) of one batch.

    The longest row, not the padded width: the step's model FLOPs count the positions a batch needs,
    so a side that pads further (pg_tune rounds to ``data.pad_to_multiple_of``) is not credited for
    the padding it computes.

    Encoder passes are images, or for tiled families (SmolVLM2: ``pixel_values`` of ``[batch, tiles,
    3, h, w]``) the real tiles, those with any pixel in ``pixel_attention_mask``.
    """
    labels = batch["labels"]
    pixels = batch.get("pixel_values")
    if pixels is None:
        passes = 0
    elif pixels.ndim == 5 and "pixel_attention_mask" in batch:
        passes = int(batch["pixel_attention_mask"].flatten(2).any(-1).sum())
    else:
        passes = int(pixels.shape[0])
    mask = batch["attention_mask"]
    return int(mask.sum()), int(mask.sum(1).max()), int((labels[:, 1:] != -100).sum()), passes
