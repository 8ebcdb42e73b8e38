"""Greedy decoding and beam search, batched across images.

Beam search keeps all beams of all images in one tensor of B*k rows and advances them with one
`decoder.step` per word. A beam that has emitted <end> stays in the beam with <end> as its only
continuation at zero cost, so it keeps its rank without being expanded again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raycap.models.decoders import Decoder


@dataclass
class Caption:
    """One decoded caption."""

    tokens: list[int]  # word ids, without <start> and <end>
    score: float  # log-probability of the words and <end>, divided by length**length_norm
    alphas: torch.Tensor | None  # (len(tokens), P) attention per word, attention decoder only


def _truncate(seq: torch.Tensor, end_id: int) -> int:
    """Number of words before the first <end> in a 1-D sequence."""
    ends = (seq == end_id).nonzero()
    return int(ends[0]) if len(ends) else int(seq.numel())


@torch.inference_mode()
def greedy_decode(decoder: Decoder, features: torch.Tensor, start_id: int, end_id: int, max_len: int = 50) -> list[Caption]:
    """Most likely word at each step, for a batch of images: features (B, P, C)."""
    batch = features.size(0)
    memory = decoder.prepare(features)
    state = decoder.init_state(memory)
    tokens = torch.full((batch,), start_id, dtype=torch.long, device=features.device)  # (B,)
    finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
    words, log_probs, alphas = [], [], []
    for t in range(max_len + 1):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        if t == max_len:  # out of words: the caption ends here, scored with <end>
            tokens = torch.full_like(tokens, end_id)
            step_logp = logp[:, end_id]
        else:
            step_logp, tokens = logp.max(dim=-1)  # (B,), (B,)
        words.append(tokens)
        log_probs.append(torch.where(finished, 0.0, step_logp))
        alphas.append(alpha)
        finished = finished | (tokens == end_id)
        if bool(finished.all()):
            break
    seqs = torch.stack(words, dim=1)  # (B, L)
    total = torch.stack(log_probs, dim=1).sum(dim=1)  # (B,)
    attn = torch.stack(alphas, dim=1) if alphas[0] is not None else None  # (B, L, P)
    out = []
    for i in range(batch):
        n = min(_truncate(seqs[i], end_id), max_len)
        out.append(Caption(seqs[i, :n].tolist(), float(total[i]), None if attn is None else attn[i, :n].cpu()))
    return out


@torch.inference_mode()
def beam_search(
    decoder: Decoder,
    features: torch.Tensor,
    start_id: int,
    end_id: int,
    beam_size: int = 3,
    max_len: int = 50,
    length_norm: float = 0.0,
    num_captions: int = 1,
) -> list[list[Caption]]:
    """Best `num_captions` captions per image, best first: features (B, P, C) -> B lists.

    Scores are summed log-probabilities; with `length_norm` > 0 the final ranking divides them by
    length**length_norm (0 ranks by raw log-probability, as the reference does).
    """
    k, vocab = beam_size, decoder.vocab_size
    if not 1 <= num_captions <= k <= vocab:
        raise ValueError(f"need 1 <= num_captions ({num_captions}) <= beam_size ({k}) <= vocab size ({vocab})")
    batch, device = features.size(0), features.device
    memory = decoder.prepare(features)  # (B, ...): beams never change image, so it is never reordered
    state = tuple(s.repeat_interleave(k, dim=0) for s in decoder.init_state(memory))  # (B*k, ...)

    scores = torch.full((batch, k), float("-inf"), device=device)  # (B, k)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((batch * k,), start_id, dtype=torch.long, device=device)  # (B*k,)
    seqs = torch.empty((batch, k, 0), dtype=torch.long, device=device)  # (B, k, t)
    attn: torch.Tensor | None = None  # (B, k, t, P)
    finished = torch.zeros((batch, k), dtype=torch.bool, device=device)
    lengths = torch.zeros((batch, k), device=device)  # words emitted, <end> included
    only_end = torch.full((vocab,), float("-inf"), device=device)
    only_end[end_id] = 0.0
    row_base = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)

    for t in range(max_len + 1):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logp = torch.log_softmax(logits.float(), dim=-1).view(batch, k, vocab)  # (B, k, V)
        logp = torch.where(finished.unsqueeze(2), only_end, logp)
        if t == max_len:  # out of words: every open caption ends here, scored with <end>
            logp = logp + only_end
        top_scores, top_idx = (scores.unsqueeze(2) + logp).view(batch, k * vocab).topk(k, dim=1)  # (B, k)
        parent, words = top_idx // vocab, top_idx % vocab  # (B, k) each

        rows = (row_base + parent).view(-1)  # (B*k,) parent row of each new beam
        state = tuple(s.index_select(0, rows) for s in state)
        seqs = torch.cat([seqs.gather(1, parent.unsqueeze(2).expand(-1, -1, t)), words.unsqueeze(2)], dim=2)
        if alpha is not None:
            step_alpha = alpha.view(batch, k, 1, -1).gather(1, parent.view(batch, k, 1, 1).expand(-1, -1, 1, alpha.size(-1)))
            attn = step_alpha if attn is None else torch.cat(
                [attn.gather(1, parent.view(batch, k, 1, 1).expand(-1, -1, t, attn.size(-1))), step_alpha], dim=2
            )  # (B, k, t+1, P)
        was_finished = finished.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~was_finished).float()
        finished = was_finished | (words == end_id)
        scores, tokens = top_scores, words.view(-1)
        if bool(finished.all()):
            break

    ranked = scores / lengths.clamp(min=1.0) ** length_norm if length_norm else scores  # (B, k)
    order = ranked.argsort(dim=1, descending=True)
    out: list[list[Caption]] = []
    for i in range(batch):
        captions = []
        for j in order[i, :num_captions].tolist():
            n = min(_truncate(seqs[i, j], end_id), max_len)
            alphas = None if attn is None else attn[i, j, :n].cpu()
            captions.append(Caption(seqs[i, j, :n].tolist(), float(ranked[i, j]), alphas))
        out.append(captions)
    return out
