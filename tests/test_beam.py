"""Greedy decoding and batched beam search, checked against toy decoders with known answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from raycap.models.beam import Caption, beam_search, greedy_decode
from raycap.models.decoders import Decoder, DecoderConfig, DecoderOutput, Memory, State, build_decoder

START, END = 1, 2
VOCAB, FEATURES, P = 20, 16, 9
KINDS = ["gru", "attention"]


class MarkovDecoder(Decoder):
    """Toy decoder: the next word depends only on the previous one, through a fixed log-prob table."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size, self.feature_dim = log_probs.size(0), 1
        self.register_buffer("log_probs", log_probs)  # (V, V): row = previous word

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(self.log_probs[captions[:, :-1]], None)

    def prepare(self, features: torch.Tensor) -> Memory:
        return (features,)

    def init_state(self, memory: Memory) -> State:
        return (torch.zeros(memory[0].size(0), 1),)

    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, None]:
        return self.log_probs[tokens], state, None


def _markov(transitions: dict[int, dict[int, float]], vocab: int = 6) -> MarkovDecoder:
    """Rows given as {previous: {next: p}}, the rest of each row's mass spread over the other words;
    rows not given end the caption with p = 0.999."""
    table = torch.empty(vocab, vocab, dtype=torch.float64)
    for prev in range(vocab):
        given = transitions.get(prev, {END: 1.0 - 1e-3})
        rest = (1.0 - sum(given.values())) / (vocab - len(given))
        table[prev] = rest
        for word, p in given.items():
            table[prev, word] = p
    assert torch.allclose(table.sum(dim=1), torch.ones(vocab, dtype=torch.float64))
    return MarkovDecoder(table.log().float())


def _sequence_log_prob(decoder: MarkovDecoder, words: tuple[int, ...]) -> float:
    path = (START, *words, END)
    return sum(float(decoder.log_probs[a, b]) for a, b in itertools.pairwise(path))


def _brute_force_best(decoder: MarkovDecoder, max_len: int) -> tuple[tuple[int, ...], float]:
    """Highest log-probability caption of at most max_len words followed by <end>."""
    words = [w for w in range(decoder.vocab_size) if w != END]
    candidates = (seq for n in range(max_len + 1) for seq in itertools.product(words, repeat=n))
    return max(((seq, _sequence_log_prob(decoder, seq)) for seq in candidates), key=lambda item: item[1])


ONE_IMAGE = torch.zeros(1, 1, 1)  # (B, P, C): the toy decoder ignores features

# Words 3=A, 4=B, 5=C. Greedy takes A (0.6), whose continuations are all unlikely; B (0.4) then
# <end> is certain, the best caption overall.
GREEDY_TRAP = {START: {3: 0.6, 4: 0.4 - 4e-3}, 3: {3: 0.25, 4: 0.25, 5: 0.25, END: 0.25 - 1e-3}, 4: {END: 0.999}}


def _decoder(kind: str, seed: int = 0, end_bias: float = 1.5) -> Decoder:
    """A small random decoder whose outputs are peaked enough that captions end at varied lengths."""
    torch.manual_seed(seed)
    decoder = build_decoder(DecoderConfig(kind=kind, embed_dim=32, decoder_dim=32, attention_dim=32), VOCAB, FEATURES)
    with torch.no_grad():
        decoder.fc.weight.normal_(0, 0.6)
        decoder.fc.bias[END] = end_bias
    return decoder.eval()


def _features(batch: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, P, FEATURES, generator=torch.Generator().manual_seed(seed)) * 2  # (B, P, C)


def _rescore(decoder: Decoder, features: torch.Tensor, caption: Caption) -> tuple[float, torch.Tensor | None]:
    """Teacher-forced log-probability of tokens + <end>, and the attention while reading them."""
    ids = torch.tensor([[START, *caption.tokens, END]])
    with torch.no_grad():
        out = decoder(features.unsqueeze(0), ids)
    log_probs = torch.log_softmax(out.logits[0], dim=-1)  # (T, V)
    score = float(log_probs.gather(1, ids[0, 1:, None]).sum())
    return score, None if out.alphas is None else out.alphas[0, : len(caption.tokens)]


def test_greedy_misses_what_beam_search_finds() -> None:
    decoder = _markov(GREEDY_TRAP)
    (greedy,) = greedy_decode(decoder, ONE_IMAGE, START, END, max_len=3)
    assert greedy.tokens[0] == 3
    best, best_score = _brute_force_best(decoder, max_len=3)
    assert best == (4,)
    (beams,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=2, max_len=3)
    assert beams[0].tokens == list(best)
    assert beams[0].score == pytest.approx(best_score, abs=1e-5)
    assert beams[0].score > greedy.score


@pytest.mark.parametrize("search", ["beam", "greedy"])
def test_caption_cut_at_max_len_is_scored_with_end(search: str) -> None:
    """A B C <end> (p = 0.9^3 * 0.05) beats every shorter caption; A B C A is likelier but not a caption."""
    decoder = _markov({START: {3: 0.9}, 3: {4: 0.9}, 4: {5: 0.9}, 5: {3: 0.9, END: 0.05}})
    if search == "beam":
        (caption,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=2, max_len=3)[0]
    else:
        (caption,) = greedy_decode(decoder, ONE_IMAGE, START, END, max_len=3)
    assert caption.tokens == [3, 4, 5]
    assert caption.score == pytest.approx(_sequence_log_prob(decoder, (3, 4, 5)), abs=1e-5)


def test_captions_exclude_start_and_end_and_finished_beams_keep_their_score() -> None:
    decoder = _markov(GREEDY_TRAP)
    (beams,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=3, max_len=6, num_captions=3)
    for caption in beams:
        assert START not in caption.tokens and END not in caption.tokens
        assert caption.score == pytest.approx(_sequence_log_prob(decoder, tuple(caption.tokens)), abs=1e-5)
    assert beams[0].tokens == [4]  # finished after one word, then carried through 6 more steps unchanged


def test_num_captions_are_distinct_and_sorted_by_score() -> None:
    (beams,) = beam_search(_decoder("attention"), _features(1), START, END, beam_size=5, max_len=8, num_captions=4)
    assert len(beams) == 4
    assert len({tuple(c.tokens) for c in beams}) == 4
    scores = [c.score for c in beams]
    assert scores == sorted(scores, reverse=True)


def test_num_captions_are_distinct_when_cut_at_max_len() -> None:
    decoder = _decoder("gru", end_bias=-1e4)
    for beams in beam_search(decoder, _features(4), START, END, beam_size=3, max_len=5, num_captions=3):
        assert len({tuple(c.tokens) for c in beams}) == 3


def test_length_norm_favours_the_longer_caption() -> None:
    """A <end> scores log(0.6*0.6) = -1.02 over 2 tokens; B C D <end> scores log(0.4*0.8^3) = -1.59
    over 4 tokens: raw log-probability prefers the first, per-token the second."""
    a, b, c, d = 3, 4, 5, 6
    decoder = _markov({START: {a: 0.6, b: 0.4 - 1e-3}, a: {END: 0.6}, b: {c: 0.8}, c: {d: 0.8}, d: {END: 0.8}}, vocab=7)
    short, long = _sequence_log_prob(decoder, (a,)), _sequence_log_prob(decoder, (b, c, d))
    (raw,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=3, max_len=5, num_captions=2)
    assert [c.tokens for c in raw] == [[a], [b, c, d]]
    assert [c.score for c in raw] == pytest.approx([short, long], abs=1e-5)
    (norm,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=3, max_len=5, num_captions=2, length_norm=1.0)
    assert [c.tokens for c in norm] == [[b, c, d], [a]]
    assert [c.score for c in norm] == pytest.approx([long / 4, short / 2], abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_max_len_is_respected_when_end_never_wins(kind: str) -> None:
    decoder, features = _decoder(kind, end_bias=-1e4), _features(3)
    for beams in beam_search(decoder, features, START, END, beam_size=3, max_len=7, num_captions=3):
        assert all(len(c.tokens) == 7 for c in beams)
    assert all(len(c.tokens) == 7 for c in greedy_decode(decoder, features, START, END, max_len=7))


@pytest.mark.parametrize("kind", KINDS)
def test_beam1_equals_greedy(kind: str) -> None:
    decoder, features = _decoder(kind), _features(6)
    greedy = greedy_decode(decoder, features, START, END, max_len=12)
    beams = beam_search(decoder, features, START, END, beam_size=1, max_len=12)
    assert {len(g.tokens) for g in greedy} != {12}  # some captions end early
    for g, (b,) in zip(greedy, beams, strict=True):
        assert b.tokens == g.tokens
        assert b.score == pytest.approx(g.score, abs=1e-4)
        if g.alphas is not None:
            torch.testing.assert_close(b.alphas, g.alphas)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_beam_search_equals_per_image(kind: str, beam_size: int) -> None:
    decoder, features = _decoder(kind), _features(6)
    kwargs = dict(beam_size=beam_size, max_len=12, num_captions=2)
    batched = beam_search(decoder, features, START, END, **kwargs)
    lengths = set()
    for i in range(features.size(0)):
        (alone,) = beam_search(decoder, features[i : i + 1], START, END, **kwargs)
        for a, b in zip(alone, batched[i], strict=True):
            assert a.tokens == b.tokens
            assert a.score == pytest.approx(b.score, abs=1e-4)
            lengths.add(len(a.tokens))
    assert len(lengths) > 1  # images finish at different steps


@pytest.mark.parametrize("kind", KINDS)
def test_beam_scores_and_attention_match_teacher_forced_rescoring(kind: str) -> None:
    """Reordering beams must keep each caption's words, score and attention history together."""
    decoder, features = _decoder(kind), _features(4)
    results = beam_search(decoder, features, START, END, beam_size=4, max_len=15, num_captions=3)
    for i, beams in enumerate(results):
        for caption in beams:
            assert len(caption.tokens) < 15  # ended, so the score covers exactly tokens + <end>
            score, alphas = _rescore(decoder, features[i], caption)
            assert caption.score == pytest.approx(score, abs=1e-4)
            if kind == "attention":
                assert caption.alphas is not None and caption.alphas.shape == (len(caption.tokens), P)
                torch.testing.assert_close(caption.alphas.sum(dim=1), torch.ones(len(caption.tokens)))
                torch.testing.assert_close(caption.alphas, alphas, rtol=1e-4, atol=1e-5)
            else:
                assert caption.alphas is None


def test_greedy_attention_rows_are_distributions() -> None:
    for caption in greedy_decode(_decoder("attention"), _features(3), START, END, max_len=10):
        assert caption.alphas is not None and caption.alphas.shape == (len(caption.tokens), P)
        torch.testing.assert_close(caption.alphas.sum(dim=1), torch.ones(len(caption.tokens)))


@pytest.mark.parametrize(
    ("beam_size", "num_captions"), [(0, 1), (3, 0), (2, 3), (VOCAB + 1, 1)]
)
def test_invalid_beam_or_num_captions_raise_value_error(beam_size: int, num_captions: int) -> None:
    with pytest.raises(ValueError, match="num_captions"):
        beam_search(_decoder("gru"), _features(1), START, END, beam_size=beam_size, num_captions=num_captions)
