"""The training recipe without Ray: the step plan (captions per step, steps per epoch, lr rule),
cutting image rows into caption steps, and the per-step learning rate."""

from __future__ import annotations

import math

import pytest
import torch

from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.recipe import TrainConfig, caption_steps, plan_training, train_epoch

PAD = 0


def _image_batches(n_images: int, batch: int, k: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Image rows as a worker's shard yields them: features (B, 1, 1) hold the image number, captions
    (B, k, 2) hold image * 10 + caption number, so every pair can be traced."""
    out = []
    for start in range(0, n_images, batch):
        ids = torch.arange(start, min(start + batch, n_images))  # (B,)
        captions = torch.stack([ids * 10 + j for j in range(k)], dim=1).unsqueeze(2).expand(-1, -1, 2)  # (B, k, 2)
        out.append((ids.float().view(-1, 1, 1), captions.clone()))
    return out


@pytest.mark.parametrize(("images", "workers", "step"), [(1003, 1, 32), (1003, 4, 32), (1003, 8, 32), (77, 2, 128)])
def test_steps_per_epoch_are_what_each_worker_takes(images: int, workers: int, step: int) -> None:
    plan = plan_training(images, 5 * images + 3, 5, TrainConfig(captions_per_step=step), workers)
    assert plan.per_worker * workers == step
    # Each worker gets images // workers rows (Ray Train's equal split) in batches of any size.
    taken = list(caption_steps(_image_batches(images // workers, 24), plan.per_worker, torch.Generator()))
    assert len(taken) == plan.steps_per_epoch
    assert all(len(captions) == plan.per_worker for _, captions in taken[:-1])
    assert sum(len(captions) for _, captions in taken) == 5 * (images // workers)


def test_karpathy_and_coco_2017_counts_give_the_readme_figures() -> None:
    karpathy = [plan_training(113_287, 566_747, 5, TrainConfig(), w).steps_per_epoch for w in (1, 4, 8)]
    coco2017 = [plan_training(118_287, 591_753, 5, TrainConfig(), w).steps_per_epoch for w in (1, 4, 8)]
    assert karpathy == [17_702, 17_701, 17_700]
    assert coco2017 == [18_483, 18_482, 18_482]


def test_a_step_that_does_not_divide_among_workers_is_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match=r"captions_per_step 30 does not divide among 4 workers.*e\.g\. 28 or 32"):
        plan_training(100, 500, 5, TrainConfig(captions_per_step=30), 4)
    with pytest.raises(ValueError, match="captions_per_step 2 does not divide among 4 workers.*e.g. 4"):
        plan_training(100, 500, 5, TrainConfig(captions_per_step=2), 4)
    with pytest.raises(ValueError, match="3 training images cannot feed 4 workers"):
        plan_training(3, 15, 5, TrainConfig(), 4)
    with pytest.raises(ValueError, match=r"captions_per_step \(--captions-per-step\) must be >= 1"):
        TrainConfig(captions_per_step=0)


def test_linear_rule_scales_the_lr_and_warms_up_from_the_reference_lr() -> None:
    plan = plan_training(1000, 5000, 5, TrainConfig(captions_per_step=128, lr=4e-4, warmup_epochs=0.5), 2)
    assert plan.lr == pytest.approx(1.6e-3)
    assert plan.warmup_steps == math.ceil(0.5 * plan.steps_per_epoch)
    factors = [plan.warmup_factor(s) for s in range(plan.warmup_steps + 3)]
    assert factors[0] * plan.lr == pytest.approx(4e-4)  # starts at the 32-caption reference
    assert factors == sorted(factors) and factors[-1] == factors[plan.warmup_steps] == 1.0
    reference = plan_training(1000, 5000, 5, TrainConfig(), 2)
    assert (reference.lr, reference.warmup_steps, reference.warmup_factor(0)) == (4e-4, 0, 1.0)
    fixed = plan_training(1000, 5000, 5, TrainConfig(captions_per_step=128, lr_rule="none"), 2)
    assert (fixed.lr, fixed.warmup_steps) == (4e-4, 0)
    smaller = plan_training(1000, 5000, 5, TrainConfig(captions_per_step=16), 2)
    assert (smaller.lr, smaller.warmup_steps) == (pytest.approx(2e-4), 0)  # nothing to warm up to
    assert "lr 1.60e-03 = 4.00e-04 x 128/32 (linear rule)" in "\n".join(plan.describe())


def test_caption_steps_give_every_pair_once_with_its_own_image() -> None:
    taken = list(caption_steps(_image_batches(23, 6), 7, torch.Generator().manual_seed(0)))
    assert [len(c) for _, c in taken] == [7] * 16 + [3]  # 115 pairs
    pairs = [(int(f), int(c[0])) for features, captions in taken for f, c in zip(features.flatten(), captions)]
    assert sorted(c for _, c in pairs) == sorted(i * 10 + j for i in range(23) for j in range(5))
    assert all(c // 10 == f for f, c in pairs)  # each caption comes with its image's features


def test_caption_steps_shuffle_pairs_by_the_generator_seed() -> None:
    def order(seed: int) -> list[int]:
        steps = caption_steps(_image_batches(20, 20), 8, torch.Generator().manual_seed(seed))
        return [int(c[0]) for _, captions in steps for c in captions]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != sorted(order(1))


def test_train_epoch_sets_each_steps_lr_and_counts_steps() -> None:
    torch.manual_seed(0)
    decoder = build_decoder(DecoderConfig("gru", embed_dim=8, decoder_dim=8, dropout=0.0), 6, 4)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1.0)
    batches = [(torch.randn(3, 2, 4), torch.randint(1, 6, (3, 5))) for _ in range(3)]  # (B, P, C), (B, L)
    asked: list[int] = []

    def lr_at(step: int) -> float:
        asked.append(step)
        return 1e-3 * (step + 1)

    metrics = train_epoch(decoder, batches, optimizer, TrainConfig(), PAD, lr_at)
    assert asked == [0, 1, 2] and metrics["steps"] == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)
