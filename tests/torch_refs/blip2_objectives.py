"""BLIP-2's stage-1 losses in plain torch, written from LAVIS's ``Blip2Qformer.forward``
(lavis/models/blip2_models/blip2_qformer.py) for a run over ``ranks`` GPUs of equal local batch: each
rank compares its own rows with the columns gathered from every rank, and the reported loss is the
mean over ranks (DDP's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_loss(image_feats, text_feat, temp, ranks: int = 1) -> torch.Tensor:
    """image_feats (B, Q, E), text_feat (B, E) unnormalized; B = ranks * local batch."""
    image_feats, text_feat = F.normalize(image_feats, dim=-1), F.normalize(text_feat, dim=-1)
    bs = image_feats.shape[0] // ranks
    losses = []
    for rank in range(ranks):
        img, txt = image_feats[rank * bs : (rank + 1) * bs], text_feat[rank * bs : (rank + 1) * bs]
        sim_q2t = torch.matmul(img.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1)  # (bs, B, Q)
        sim_i2t = sim_q2t.max(-1).values / temp
        sim_t2q = torch.matmul(txt.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2)
        sim_t2i = sim_t2q.max(-1).values / temp
        targets = torch.arange(rank * bs, rank * bs + bs)
        losses.append(
            (
                F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
            )
            / 2  # fmt: skip
        )
    return torch.stack(losses).mean()


def negative_weights(sim_i2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_i2t, weights_t2i) of a one-rank batch: the positive filled with -10000, softmax."""
    sim_i2t, sim_t2i = sim_i2t.clone(), sim_i2t.t().clone()
    sim_t2i.fill_diagonal_(-10000)
    sim_i2t.fill_diagonal_(-10000)
    return F.softmax(sim_i2t, dim=1), F.softmax(sim_t2i, dim=1)


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits (3 bs, 2) in LAVIS's order: bs positives, then 2 bs negatives."""
    bs = logits.shape[0] // 3
    labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
    return F.cross_entropy(logits, labels)


def itg_loss(prediction_scores, input_ids, pad_token_id: int) -> torch.Tensor:
    """BertLMHeadModel's loss with labels = decoder ids, padding -> -100 (prediction_scores (B, T, V))."""
    labels = input_ids.masked_fill(input_ids == pad_token_id, -100)
    shifted = prediction_scores[:, :-1, :].contiguous()
    labels = labels[:, 1:].contiguous()
    return torch.nn.CrossEntropyLoss(label_smoothing=0.1)(
        shifted.view(-1, shifted.shape[-1]), labels.view(-1)
    )
