"""Greedy decoding and beam search, batched across images.

Beam search keeps all beams of all images in one tensor of B*k rows and advances them with one
`decoder.step` per word. A beam that has emitted <end> stays in the beam with <end> as its only
continuation at zero cost, so it keeps its rank without being expanded again. Word ids in `banned`
(callers pass <unk>) get log-probability -inf, so no caption holds them; scores stay the model's.
Each step ranks only each beam's k best words (all that can reach its image's k best), and keeps
each new beam's word and parent; the captions and their attention are traced back once, at the end.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from raycap.models.decoders import Decoder
from raycap.models.decoding import BEAM_SIZE, MAX_DECODE_LEN


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


def _ban(vocab: int, banned: Collection[int], end_id: int, device: torch.device) -> torch.Tensor:
    """The banned word ids, checked, as a tensor to `index_fill_` log-probabilities with -inf."""
    bad = sorted(w for w in set(banned) if w == end_id or not 0 <= w < vocab)
    if bad:
        raise ValueError(f"cannot ban word ids {bad}: need ids in [0, {vocab}), <end> ({end_id}) excluded")
    return torch.tensor(sorted(set(banned)), dtype=torch.long, device=device)  # (banned,)


# Both searches enter inference mode in a block, not by decorator: mutmut (the mutation tests, see
# pyproject.toml) skips decorated functions.
def greedy_decode(
    decoder: Decoder,
    features: torch.Tensor,
    start_id: int,
    end_id: int,
    max_len: int = MAX_DECODE_LEN,
    banned: Collection[int] = (),
) -> list[Caption]:
    """Most likely word at each step, for a batch of images: features (B, P, C). Word ids in
    `banned` (e.g. <unk>) are never emitted; scores stay the model's log-probabilities."""
    with torch.inference_mode():
        batch = features.size(0)
        banned_ids = _ban(decoder.vocab_size, banned, end_id, features.device)
        memory = decoder.prepare(features)
        state = decoder.init_state(memory)
        tokens = torch.full((batch,), start_id, dtype=torch.long, device=features.device)  # (B,)
        finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
        words, log_probs, alphas = [], [], []
        for t in range(max_len + 1):
            logits, state, alpha = decoder.step(tokens, state, memory)
            logp = torch.log_softmax(logits.float(), dim=-1).index_fill_(1, banned_ids, float("-inf"))  # (B, V)
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


def beam_search(
    decoder: Decoder,
    features: torch.Tensor,
    start_id: int,
    end_id: int,
    beam_size: int = BEAM_SIZE,
    max_len: int = MAX_DECODE_LEN,
    length_norm: float = 0.0,
    num_captions: int = 1,
    banned: Collection[int] = (),
) -> list[list[Caption]]:
    """Best `num_captions` captions per image, best first: features (B, P, C) -> B lists.

    Scores are summed log-probabilities; with `length_norm` > 0 the final ranking divides them by
    length**length_norm (0 ranks by raw log-probability, as the reference does). Word ids in
    `banned` (e.g. <unk>) are never emitted.
    """
    with torch.inference_mode():
        k, vocab = beam_size, decoder.vocab_size
        batch, device = features.size(0), features.device
        banned_ids = _ban(vocab, banned, end_id, device)
        allowed = vocab - banned_ids.numel()
        if not 1 <= num_captions <= k <= allowed:
            raise ValueError(
                f"need 1 <= num_captions ({num_captions}) <= beam_size ({k}) <= vocab size less banned words ({allowed})"
            )
        memory = decoder.prepare(features)  # (B, ...): beams never change image, so it is never reordered
        state = tuple(s.repeat_interleave(k, dim=0) for s in decoder.init_state(memory))  # (B*k, ...)

        scores = torch.full((batch, k), float("-inf"), device=device)  # (B, k)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        tokens = torch.full((batch * k,), start_id, dtype=torch.long, device=device)  # (B*k,)
        finished = torch.zeros((batch * k, 1), dtype=torch.bool, device=device)  # (B*k, 1)
        end_only = torch.full((k,), float("-inf"), device=device)  # a finished beam's candidates: <end> at no cost
        end_only[0] = 0.0
        row_base = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)
        # Per step: each new beam's parent beam and word (B, k), the attention of the old beams (B*k, P).
        parents: list[torch.Tensor] = []
        words: list[torch.Tensor] = []
        alphas: list[torch.Tensor] = []

        for t in range(max_len + 1):
            logits, state, alpha = decoder.step(tokens, state, memory)
            logp = torch.log_softmax(logits.float(), dim=-1).index_fill_(1, banned_ids, float("-inf"))  # (B*k, V)
            if t == max_len:  # out of words: every open caption ends here, scored with <end>
                cand_logp = logp[:, end_id : end_id + 1]  # (B*k, 1)
                cand_words = torch.full_like(cand_logp, end_id, dtype=torch.long)
            else:  # a beam's k best words hold all it can add to its image's k best
                cand_logp, cand_words = logp.topk(k, dim=1)  # (B*k, k) each
            cand_logp = torch.where(finished, end_only[: cand_logp.size(1)], cand_logp)
            cand_words = cand_words.masked_fill(finished, end_id)
            total = scores.unsqueeze(2) + cand_logp.view(batch, k, -1)  # (B, k, c): c candidates per beam
            scores, pick = total.view(batch, -1).topk(k, dim=1)  # (B, k) each
            parent = pick // cand_logp.size(1)  # (B, k)
            state = tuple(s.index_select(0, (row_base + parent).view(-1)) for s in state)
            tokens = cand_words.view(batch, -1).gather(1, pick).view(-1)  # (B*k,)
            parents.append(parent)
            words.append(tokens.view(batch, k))
            if alpha is not None:
                alphas.append(alpha)
            finished = (tokens == end_id).unsqueeze(1)  # a finished beam only ever adds <end>
            if bool(finished.all()):
                break

        # Trace each final beam back: path[..., t] is the beam it descends from before step t.
        path = [torch.arange(k, device=device).expand(batch, k)]  # (B, k) each, from the last step back
        for parent in reversed(parents):
            path.append(parent.gather(1, path[-1]))
        lineage = torch.stack(path[::-1], dim=2)  # (B, k, L+1)
        seqs = torch.stack(words, dim=2).gather(1, lineage[..., 1:])  # (B, k, L)
        sizes = (seqs == end_id).float().argmax(dim=2)  # (B, k) words before the first <end>; every beam has one
        ranked = scores / (sizes + 1.0) ** length_norm  # (B, k); length counts <end>
        order = ranked.argsort(dim=1, descending=True)[:, :num_captions]  # (B, n) best beams, best first
        tokens_out = seqs.gather(1, order.unsqueeze(2).expand(-1, -1, seqs.size(2))).tolist()  # (B, n, L)
        sizes_out, scores_out = sizes.gather(1, order).tolist(), ranked.gather(1, order).tolist()  # (B, n) each
        attn = None
        if alphas:
            steps = torch.stack(alphas, dim=1).view(batch, k, len(alphas), -1)  # (B, k, L, P), by each step's old beam
            src = lineage[..., :-1].gather(1, order.unsqueeze(2).expand(-1, -1, len(alphas)))  # (B, n, L)
            attn = steps.gather(1, src.unsqueeze(3).expand(-1, -1, -1, steps.size(3)))  # (B, n, L, P)
        out: list[list[Caption]] = []
        for i in range(batch):
            captions = []
            for r, (n, score) in enumerate(zip(sizes_out[i], scores_out[i], strict=True)):
                captions.append(Caption(tokens_out[i][r][:n], score, None if attn is None else attn[i, r, :n].cpu()))
            out.append(captions)
        return out
