"""`--objective re` against HierarCaps' own trainer (TAU-VAILab/hierarcaps code/train.py): the loss
recomputed here from the reference's definitions, written out independently of pipeline code, and
the optimisation defaults of its get_opts/train."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import RadialTrainConfig, load_config
from pipeline.train.losses import exterior_angle, radial_embedding_loss

LAMBDAS = dict(lambda_e=1.0, lambda_m=1.0, lambda_p=10.0)  # train.py:25-27


def reference_loss(positives, negatives, root, frozen_all, lambda_e, lambda_m, lambda_p):
    """train.py:141-205 restated: E holds the positives' 4 tiers then the negatives' 4 tiers, each
    (b, D); the exterior angle of (i, j) is taken at E[i] between E[i] - root and E[j] - E[i]."""
    b = positives.shape[0]
    E = torch.cat([positives.transpose(0, 1), negatives.transpose(0, 1)])  # (8, b, D): item-major
    frozen = frozen_all.reshape(2, b, 4, -1).transpose(1, 2).reshape(8, b, -1)  # the same order

    def ext(i, j):
        a = E[i] - root
        towards = (E[j] - root) - a
        cos = (a * towards).sum(-1) / (a.norm(dim=-1) * towards.norm(dim=-1))
        return cos.clip(min=-1.0, max=1.0).acos()

    P = torch.stack([ext(i, i + 1) for i in range(3)])  # (3, b)
    N = torch.stack([-ext(i, i + 4) for i in range(3)])
    eloss = P.mean() + N.mean()
    Pr, Nr = P.ravel(), N.ravel()
    PNr = Pr + Nr
    mloss = PNr[Pr.argmax()] + PNr[Nr.argmax()]
    ploss = (1 - torch.einsum("tbi,tbi->tb", E, frozen).mean()) / 2
    return lambda_p * ploss + lambda_e * eloss + lambda_m * mloss, (eloss, mloss, ploss)


def random_batch(seed: int, b: int = 8, d: int = 32, dtype=torch.float64):
    """Unit embeddings of raw features that carry the gradient, as the text tower's output is normalised."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)  # noqa: E731
    raw = [torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True) for shape in ((b, 4, d), (b, 4, d), (d,))]
    # frozen embeddings of every text, in the order the objective lists them: all positives, then all negatives
    frozen = unit(2 * b * 4, d)
    return raw, frozen


def normalised(raw):
    return [torch.nn.functional.normalize(t, dim=-1) for t in raw]


def ours(positives, negatives, root, frozen, **kwargs):
    current = torch.cat([positives.reshape(-1, positives.shape[-1]), negatives.reshape(-1, negatives.shape[-1])])
    return radial_embedding_loss(positives, negatives, root, current, frozen, **{**LAMBDAS, **kwargs})


@pytest.mark.parametrize("seed", range(5))
def test_re_loss_and_its_gradients_equal_the_reference_formulas(seed):
    raw, frozen = random_batch(seed)
    loss, parts = ours(*normalised(raw), frozen)
    grads = torch.autograd.grad(loss, raw)
    expected, (eloss, mloss, ploss) = reference_loss(*normalised(raw), frozen, **LAMBDAS)
    expected_grads = torch.autograd.grad(expected, raw)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts["entailment"] == pytest.approx(eloss.item(), abs=1e-6)
    assert parts["hardest"] == pytest.approx(mloss.item(), abs=1e-6)
    assert parts["pullback"] == pytest.approx(ploss.item(), abs=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-6)


def test_re_loss_in_float32_is_within_1e6_of_the_reference():
    raw, frozen = random_batch(7, dtype=torch.float32)
    positives, negatives, root = normalised(raw)
    expected, _ = reference_loss(*(t.double() for t in (positives, negatives, root, frozen)), **LAMBDAS)
    assert ours(positives, negatives, root, frozen)[0].item() == pytest.approx(expected.item(), abs=1e-5 * max(1, abs(expected.item())))


def test_negative_tier_i_is_paired_with_positive_tier_i_and_the_last_negative_is_never_read():
    raw, frozen = random_batch(1)
    positives, negatives, root = (t.detach().requires_grad_() for t in normalised(raw))
    loss, parts = ours(positives, negatives, root, frozen)
    (grad,) = torch.autograd.grad(loss, negatives)
    # the 4th negative reaches the loss only through the pullback term (train.py:167 reads every text)
    assert torch.equal(grad[:, 3], torch.autograd.grad(ours(positives, negatives, root, frozen, lambda_e=0, lambda_m=0)[0], negatives)[0][:, 3])
    assert grad[:, :3].abs().sum() > 0
    # negative tier i set straight on from positive tier i (inside its cone) is the worst case for
    # the angle term: each pairing has exactly one such placement
    moved = negatives.detach().clone()
    moved[:, :3] = positives.detach()[:, :3] + 0.5 * (positives.detach()[:, :3] - root.detach())
    straight, _ = ours(positives, moved, root, frozen, lambda_m=0, lambda_p=0)
    shifted = negatives.detach().clone()
    shifted[:, 1:] = positives.detach()[:, :3] + 0.5 * (positives.detach()[:, :3] - root.detach())
    off_by_one, _ = ours(positives, shifted, root, frozen, lambda_m=0, lambda_p=0)
    # straight-on negatives have angle 0: the negative term adds nothing, the loss is the positives' mean
    P = exterior_angle(positives[:, :-1], positives[:, 1:], root).mean()
    assert straight.item() == pytest.approx(P.item(), abs=1e-6)
    assert off_by_one.item() < straight.item() - 0.1  # tier i+1's negative is not the one read


def test_hardest_term_pairs_each_argmax_with_its_own_sample_and_tier():
    # hand-made angles: 2 samples x 3 tiers, the largest positive angle and the smallest negative
    # angle sit at different (tier, sample) places; the term counts P + N at both
    root = torch.zeros(2, dtype=torch.float64)
    angle = lambda t: torch.tensor([math.cos(t), math.sin(t)], dtype=torch.float64)  # noqa: E731
    p_angles = [[0.1, 0.2, 0.3], [0.9, 0.4, 0.5]]
    n_angles = [[2.0, 0.7, 2.5], [3.0, 2.2, 1.5]]
    positives = torch.zeros(2, 4, 2, dtype=torch.float64)
    negatives = torch.zeros(2, 4, 2, dtype=torch.float64)
    for s in range(2):
        positives[s, 0] = angle(0.0)
        for i in range(3):
            # the step from tier i turns by p_angles[s][i] from the radial direction of tier i
            direction = positives[s, i] / positives[s, i].norm()
            heading = torch.atan2(direction[1], direction[0])
            positives[s, i + 1] = positives[s, i] + angle(float(heading) + p_angles[s][i])
            negatives[s, i] = positives[s, i] + angle(float(heading) - n_angles[s][i])
        negatives[s, 3] = torch.tensor([5.0, 5.0])
    frozen = torch.nn.functional.normalize(torch.cat([positives.reshape(-1, 2), negatives.reshape(-1, 2)]), dim=-1)
    _, parts = ours(positives, negatives, root, frozen)
    # argmax P = (sample 1, tier 0): 0.9 - 3.0; argmax N (smallest angle) = (sample 0, tier 1): 0.2 - 0.7
    assert parts["hardest"] == pytest.approx((0.9 - 3.0) + (0.2 - 0.7), abs=1e-9)
    assert parts["entailment"] == pytest.approx(sum(map(sum, p_angles)) / 6 - sum(map(sum, n_angles)) / 6, abs=1e-9)


def test_cosine_is_clipped_at_1_as_the_reference_and_the_margin_is_a_setting():
    root = torch.zeros(2)
    start = torch.tensor([1.0, 0.0], requires_grad=True)
    straight_on, reversed_ = torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.0])
    # the reference's clip at [-1, 1] (train.py:183): exactly 0 straight on and exactly pi reversed
    assert exterior_angle(start, straight_on, root).item() == 0.0
    assert exterior_angle(start, reversed_, root).item() == pytest.approx(math.pi, abs=1e-7)
    # the margin setting stops short of both ends, where acos' slope is infinite
    margin = 1 - 1e-6
    assert exterior_angle(start, straight_on, root, margin).item() == pytest.approx(math.acos(margin), rel=2e-2)  # float32 rounds the margin
    (grad,) = torch.autograd.grad(exterior_angle(start, straight_on, root, margin), start)
    assert torch.isfinite(grad).all()
    assert load_config(None, ["radial.cosine_clip=0.999999"]).radial.cosine_clip == 0.999999


def test_re_defaults_are_the_reference_trainer_s():
    s = RadialTrainConfig()
    # get_opts (train.py:17-32) and train (train.py:212: torch AdamW, weight decay left at its 0.01)
    assert (s.model, s.epochs, s.batch_size, s.learning_rate) == ("openai/clip-vit-base-patch32", 1.0, 8, 1e-7)
    assert (s.lambda_p, s.lambda_e, s.lambda_m) == (10.0, 1.0, 1.0)
    assert s.weight_decay == torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["weight_decay"] == 0.01
    # every parameter decayed, constant lr with no warm-up, no clipping (train.py:249 is commented out), fp32
    assert (s.weight_decay_exempt, s.schedule, s.warmup_steps, s.max_grad_norm, s.bf16, s.tf32) == ("none", "constant", 0, 0.0, False, False)
    assert s.cosine_clip == 1.0
