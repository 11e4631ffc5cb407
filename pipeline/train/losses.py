"""The training objectives' losses, on L2-normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates `x` from every process (with gradients) under torchrun; itself otherwise.
    Processes may hold different numbers of rows (regions per batch vary): rows are padded to the
    largest count for the collective and the padding dropped after."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    largest = int(max(c.item() for c in counts))
    padded = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    return torch.cat([part[: int(n.item())] for part, n in zip(all_gather(padded), counts)])


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` matches row i of `b`, every other row is a negative."""
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def hard_negative_loss(regions: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per region, cross-entropy over its positive phrase (class 0) and its K hard negatives.
    regions, positives: (R, D); negatives: (R, K, D)."""
    positive = (regions * positives).sum(-1, keepdim=True)
    negative = torch.einsum("rd,rkd->rk", regions, negatives)
    logits = scale * torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(regions.shape[0], dtype=torch.long, device=regions.device))


def exterior_angle(specific_from: torch.Tensor, to: torch.Tensor, root: torch.Tensor, cosine_clip: float = 1.0) -> torch.Tensor:
    """The angle at `specific_from` between (specific_from - root) and (to - specific_from): 0 when
    `to` lies straight on, further from the root in the same direction (inside its cone). The cosine
    is clipped to [-cosine_clip, cosine_clip] before acos (HierarCaps' train.py:183 clips at 1)."""
    cosine = F.cosine_similarity(specific_from - root, to - specific_from, dim=-1)
    return torch.acos(cosine.clamp(-cosine_clip, cosine_clip))


def radial_embedding_loss(positives, negatives, root, current, frozen, lambda_e: float, lambda_m: float, lambda_p: float, cosine_clip: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Radial Embedding loss, term by term as HierarCaps' code/train.py:174-205 computes it.
    positives, negatives: (B, T, D) tiers generic to specific; root: (D,) the current model's
    embedding of the empty text; current/frozen: every text's embedding now and under the frozen
    original encoder (pullback)."""
    # positive tier i -> positive tier i+1 should be straight on (small angle); positive tier i ->
    # negative tier i (a wrong specialisation at the same depth) should leave the cone (large angle).
    # The last tier's negative is never read (train.py:187-188).
    tiers = positives.shape[1]
    P = exterior_angle(positives[:, :-1], positives[:, 1:], root, cosine_clip)  # (B, T-1)
    N = -exterior_angle(positives[:, :-1], negatives[:, : tiers - 1], root, cosine_clip)  # negated angle
    entail = P.mean() + N.mean()
    # the hardest examples (train.py:194-199): the (tier, sample) with the largest positive angle and
    # the one with the smallest negative angle, each counted with both its terms
    PN = (P + N).flatten()
    hardest = PN[P.flatten().argmax()] + PN[N.flatten().argmax()]
    # both sides are L2-normalised: the dot product is their cosine (train.py:134-135)
    pullback = (1 - (current * frozen).sum(-1).mean()) / 2
    loss = lambda_e * entail + lambda_m * hardest + lambda_p * pullback
    return loss, {"entailment": entail.item(), "hardest": hardest.item(), "pullback": pullback.item()}
