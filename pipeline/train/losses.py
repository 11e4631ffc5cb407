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


def exterior_angle(specific_from: torch.Tensor, to: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """The angle at `specific_from` between (specific_from - root) and (to - specific_from): 0 when
    `to` lies straight on, further from the root in the same direction (inside its cone)."""
    cosine = F.cosine_similarity(specific_from - root, to - specific_from, dim=-1)
    return torch.acos(cosine.clamp(-1 + 1e-6, 1 - 1e-6))


def radial_embedding_loss(positives, negatives, root, current, frozen, lambda_e: float, lambda_m: float, lambda_p: float) -> tuple[torch.Tensor, dict]:
    """Radial Embedding loss. positives, negatives: (B, T, D) tiers generic to specific; root: (D,)
    the current model's embedding of the empty text; current/frozen: every text's embedding now and
    under the frozen original encoder (pullback)."""
    positive_angles = exterior_angle(positives[:, :-1], positives[:, 1:], root)  # tier i -> tier i+1
    negative_angles = exterior_angle(positives[:, :-1], negatives[:, 1:], root)  # tier i -> negative of tier i+1
    entail = positive_angles.mean() - negative_angles.mean()
    hardest = positive_angles.max() - negative_angles.min()
    pullback = ((1 - F.cosine_similarity(current, frozen, dim=-1)) / 2).mean()
    loss = lambda_e * entail + lambda_m * hardest + lambda_p * pullback
    return loss, {"entailment": entail.item(), "hardest": hardest.item(), "pullback": pullback.item()}
