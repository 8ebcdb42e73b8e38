"""Caption decoders: a GRU baseline and Show, Attend and Tell's soft-attention LSTM.

Both read image features (B, P, C) -- P grid positions of C channels, pooled on arrival to the
decoder's grid (`EncoderConfig.grid`) -- and share one interface:
`forward` runs teacher forcing over a whole caption; `prepare`, `init_state` and `step` advance one
word at a time for greedy and beam search (`raycap.models.beam`), the attention decoder's with its
attention rewritten for speed (`Attention`). States are tuples of batch-first
tensors, so a search can reorder them with `index_select` without knowing the decoder. A step may
carry k beams per image: memory keeps one row per image (B) and the state B*k rows grouped by image,
so the image side is never copied k times.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from raycap.config import check_bounds, flag
from raycap.models.encoder import pool_to_grid

Memory = tuple[torch.Tensor, ...]  # per-image tensors computed once per caption
State = tuple[torch.Tensor, ...]  # per-beam recurrent state, batch-first


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder hyper-parameters; defaults are the reference's."""

    kind: str = flag("--model", "attention", help="decoder to train: attention or gru")
    embed_dim: int = flag("--embed-dim", 512, at_least=1)
    decoder_dim: int = flag("--decoder-dim", 512, at_least=1)
    attention_dim: int = flag("--attention-dim", 512, at_least=1)
    dropout: float = flag("--dropout", 0.5, at_least=0, at_most=0.99)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.kind not in DECODERS:
            raise ValueError(f"unknown decoder {self.kind!r}: choose one of {sorted(DECODERS)}")


class DecoderOutput(NamedTuple):
    """A NamedTuple, so DistributedDataParallel can find the tensors in it."""

    logits: torch.Tensor  # (B, T, V) scores for words 1..T given words 0..T-1
    alphas: torch.Tensor | None  # (B, T, P) attention weights, attention decoder only


class Decoder(nn.Module, ABC):
    """Interface shared by both decoders."""

    vocab_size: int
    feature_dim: int
    grid: int | None = None  # features are pooled to grid x grid positions on arrival; None: used as given

    def at_grid(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, P, C) on any square grid -> (B, grid*grid, C), pooled on their device."""
        return features if self.grid is None else pool_to_grid(features, self.grid)

    @abstractmethod
    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        """Teacher forcing: features (B, P, C), captions (B*k, T+1), k per image grouped by image
        -> logits for captions[:, 1:]. The image side is computed once per image, not per caption."""

    @abstractmethod
    def prepare(self, features: torch.Tensor) -> Memory:
        """What `step` needs from the image, computed once: features (B, P, C) -> memory."""

    @abstractmethod
    def init_state(self, memory: Memory) -> State:
        """Initial recurrent state from the memory: a tuple of (B, ...) tensors."""

    @abstractmethod
    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """One word for N = B*k rows (k per image, grouped by image; memory has B rows):
        tokens (N,) -> (logits (N, V), new state, attention (N, P) or None)."""


class GRUDecoder(Decoder):
    """Baseline: a GRU whose initial hidden state is a linear projection of the mean image feature."""

    def __init__(self, vocab_size: int, feature_dim: int, cfg: DecoderConfig, grid: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.feature_dim, self.grid = vocab_size, feature_dim, grid
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.init_h = nn.Linear(feature_dim, cfg.decoder_dim)
        self.gru = nn.GRU(cfg.embed_dim, cfg.decoder_dim, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.decoder_dim, vocab_size)
        _init_embedding_and_output(self.embedding, self.fc)

    def prepare(self, features: torch.Tensor) -> Memory:
        return (self.at_grid(features).mean(dim=1),)  # (B, C)

    def init_state(self, memory: Memory) -> State:
        return (self.init_h(memory[0]),)  # (B, D)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        (h0,) = _per_caption(self.init_state(self.prepare(features)), captions)  # (B*k, D)
        emb = self.embedding(captions[:, :-1])  # (B*k, T, E)
        out, _ = self.gru(emb, h0.unsqueeze(0).contiguous())  # (B*k, T, D)
        return DecoderOutput(self.fc(self.dropout(out)), None)  # (B*k, T, V)

    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, None]:
        emb = self.embedding(tokens).unsqueeze(1)  # (N, 1, E)
        out, h = self.gru(emb, state[0].unsqueeze(0).contiguous())  # (N, 1, D), (1, N, D)
        return self.fc(self.dropout(out.squeeze(1))), (h.squeeze(0),), None


class Attention(nn.Module):
    """Additive (Bahdanau) attention over the feature grid: alpha = softmax_p(w . relu(e_p + d) + b),
    e_p = encoder_att(feature p), d = decoder_att(h).

    `forward` is the textbook form, which training differentiates. Search (`prepare`, `step`) gets
    the same alpha without the (B, k, P, A) tensor of e_p + d, whose memory traffic dominated a
    batched step: as relu(x) = (x + |x|)/2, w . relu(e + d) = (w.e + w.d)/2 + sum_a w_a |e_a + d_a| / 2;
    w.d and b are the same at every p, so softmax drops them, and the last sum is an L1 distance
    between |w|e/2 and -|w|d/2 over the dimensions where w > 0, less one over the rest
    (`torch.cdist`, fused and batched). Equal to `forward` up to float rounding.
    """

    def __init__(self, feature_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(feature_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def forward(self, features: torch.Tensor, projected: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, P, C), projected = encoder_att(features) (B, P, A), h (B*k, D)
        -> context (B*k, C), alpha (B*k, P)."""
        batch, pixels, _ = features.shape
        k = h.size(0) // batch
        hidden = projected.unsqueeze(1) + self.decoder_att(h).view(batch, k, 1, -1)  # (B, k, P, A)
        scores = self.full_att(hidden.relu_()).squeeze(3)  # (B, k, P)
        return _attend(scores, features)

    def _by_sign(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention dimensions ordered w > 0 first (A,), and |w|/2 in that order (A,)."""
        w = self.full_att.weight[0]  # (A,)
        order = w.argsort(descending=True, stable=True)
        return order, w[order].abs() / 2

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image side of `step`, once per image: features (B, P, C) -> w.e/2 (B, P), and |w|e/2
        over the dimensions where w > 0 (B, P, A+) and where w <= 0 (B, P, A-)."""
        order, half = self._by_sign()
        weight = self.encoder_att.weight[order] * half.unsqueeze(1)  # (A, C): encoder_att, outputs times |w|/2
        bias = self.encoder_att.bias[order] * half  # (A,)
        positive = int((self.full_att.weight > 0).sum())
        pos = F.linear(features, weight[:positive], bias[:positive])  # (B, P, A+)
        neg = F.linear(features, weight[positive:], bias[positive:])  # (B, P, A-)
        return pos.sum(dim=2) - neg.sum(dim=2), pos, neg  # w.e/2 = sum_a sign(w_a) |w_a| e_a / 2

    def step(
        self, features: torch.Tensor, half_we: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` from the `prepare`d image side (features (B, P, C) and the rest), h (B*k, D)
        -> context (B*k, C), alpha (B*k, P)."""
        batch, k = features.size(0), h.size(0) // features.size(0)
        order, half = self._by_sign()
        scaled = (self.decoder_att(h)[:, order] * -half).view(batch, k, -1)  # (B, k, A): -|w|d/2, w > 0 first
        positive = pos.size(2)
        scores = half_we.unsqueeze(1) + torch.cdist(scaled[..., :positive], pos, p=1)  # (B, k, P)
        return _attend(scores - torch.cdist(scaled[..., positive:], neg, p=1), features)


def _attend(scores: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention scores (B, k, P) over features (B, P, C) -> context (B*k, C), alpha (B*k, P)."""
    batch, k, pixels = scores.shape
    alpha = torch.softmax(scores, dim=2)  # (B, k, P)
    context = torch.bmm(alpha, features)  # (B, k, C)
    return context.view(batch * k, -1), alpha.view(batch * k, pixels)


class AttentionDecoder(Decoder):
    """Show, Attend and Tell: an LSTM cell over [word embedding; gated attention context]."""

    def __init__(self, vocab_size: int, feature_dim: int, cfg: DecoderConfig, grid: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.feature_dim, self.grid = vocab_size, feature_dim, grid
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.attention = Attention(feature_dim, cfg.decoder_dim, cfg.attention_dim)
        self.init_h = nn.Linear(feature_dim, cfg.decoder_dim)
        self.init_c = nn.Linear(feature_dim, cfg.decoder_dim)
        self.f_beta = nn.Linear(cfg.decoder_dim, feature_dim)  # gating scalar beta, per channel
        self.lstm = nn.LSTMCell(cfg.embed_dim + feature_dim, cfg.decoder_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.decoder_dim, vocab_size)
        _init_embedding_and_output(self.embedding, self.fc)

    def prepare(self, features: torch.Tensor) -> Memory:
        features = self.at_grid(features)  # (B, P, C), P = grid*grid
        return features, *self.attention.prepare(features), features.mean(dim=1)  # ..., (B, C)

    def init_state(self, memory: Memory) -> State:
        mean = memory[-1]
        return self.init_h(mean), self.init_c(mean)  # (B, D) each

    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, torch.Tensor]:
        features, *image_side, _ = memory
        context, alpha = self.attention.step(features, *image_side, state[0])  # (N, C), (N, P)
        logits, state = self._advance(tokens, state, context)
        return logits, state, alpha

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        """Teacher forcing with the textbook attention (`Attention.forward`), which training differentiates."""
        features = self.at_grid(features)  # (B, P, C)
        projected = self.attention.encoder_att(features)  # (B, P, A)
        state = _per_caption(self.init_state((features.mean(dim=1),)), captions)  # (B*k, D) each; reads the mean only
        # Only the recurrence runs word by word: embedding and output layer run once over all words,
        # so their weight gradients are one matmul each rather than one accumulation per word.
        embedded = self.embedding(captions[:, :-1])  # (B*k, T, E)
        hidden, alphas = [], []
        for t in range(embedded.size(1)):
            context, alpha = self.attention(features, projected, state[0])  # (B*k, C), (B*k, P)
            state = self._recur(embedded[:, t], state, context)
            hidden.append(state[0])
            alphas.append(alpha)
        logits = self.fc(self.dropout(torch.stack(hidden, dim=1)))  # (B*k, T, V)
        return DecoderOutput(logits, torch.stack(alphas, dim=1))  # ..., (B*k, T, P)

    def _advance(self, tokens: torch.Tensor, state: State, context: torch.Tensor) -> tuple[torch.Tensor, State]:
        """One word: tokens (N,), context (N, C) -> logits (N, V), state."""
        state = self._recur(self.embedding(tokens), state, context)
        return self.fc(self.dropout(state[0])), state

    def _recur(self, embedded: torch.Tensor, state: State, context: torch.Tensor) -> State:
        """The LSTM over [embedding; gated context]: embedded (N, E), context (N, C) -> state, (N, D) each."""
        h, c = state
        gate = torch.sigmoid(self.f_beta(h))  # (N, C)
        return self.lstm(torch.cat([embedded, gate * context], dim=1), (h, c))


def _per_caption(state: State, captions: torch.Tensor) -> State:
    """Repeat a per-image state (B, ...) for k captions per image: (B*k, ...)."""
    k, rest = divmod(captions.size(0), state[0].size(0))
    if rest:
        raise ValueError(f"{captions.size(0)} captions for {state[0].size(0)} images: need the same number per image")
    return state if k == 1 else tuple(s.repeat_interleave(k, dim=0) for s in state)


def _init_embedding_and_output(embedding: nn.Embedding, fc: nn.Linear) -> None:
    """Uniform(-0.1, 0.1) embeddings and output weights, zero output bias, as in the reference."""
    embedding.weight.data.uniform_(-0.1, 0.1)
    fc.weight.data.uniform_(-0.1, 0.1)
    fc.bias.data.zero_()


DECODERS: dict[str, type[Decoder]] = {"attention": AttentionDecoder, "gru": GRUDecoder}


def build_decoder(cfg: DecoderConfig, vocab_size: int, feature_dim: int, grid: int | None = None) -> Decoder:
    """A decoder of `cfg.kind` for features of `feature_dim` channels, pooled to grid x grid (None: as given)."""
    return DECODERS[cfg.kind](vocab_size, feature_dim, cfg, grid)


def trim_padding(captions: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing columns that are padding in every row: (B, L) -> (B, T+1), T+1 <= L."""
    longest = int((captions != pad_id).sum(dim=1).max())
    return captions[:, :longest]


def caption_loss(
    output: DecoderOutput, captions: torch.Tensor, pad_id: int, alpha_c: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, cross-entropy): CE over non-pad targets plus, for attention, the doubly
    stochastic term alpha_c * mean_i (1 - sum_t alpha_ti)^2 that pushes every position to be
    attended over the caption."""
    targets = captions[:, 1:]  # (B, T)
    ce = F.cross_entropy(output.logits.reshape(-1, output.logits.size(-1)), targets.reshape(-1), ignore_index=pad_id)
    if output.alphas is None or alpha_c == 0:
        return ce, ce
    mask = (targets != pad_id).unsqueeze(2).to(output.alphas.dtype)  # (B, T, 1)
    attended = (output.alphas * mask).sum(dim=1)  # (B, P)
    return ce + alpha_c * ((1.0 - attended) ** 2).mean(), ce
