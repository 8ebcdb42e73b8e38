"""Greedy decoding and batched beam search, checked against toy decoders with known answers and
random decoders whose captions run long, at lengths that differ per image."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from raycap.data.vocab import Vocab
from raycap.models.beam import Caption, beam_search, greedy_decode
from raycap.models.decoders import Decoder, DecoderConfig, DecoderOutput, Memory, State, build_decoder
from raycap.recipe import caption_features

START, END = 1, 2
VOCAB, FEATURES, P = 20, 16, 9
KINDS = ["gru", "attention"]


class MarkovDecoder(Decoder):
    """Toy decoder: the next word depends only on the previous one, through a fixed log-prob table.
    Counts its steps."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size, self.feature_dim, self.steps = log_probs.size(0), 1, 0
        self.register_buffer("log_probs", log_probs)  # (V, V): row = previous word

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(self.log_probs[captions[:, :-1]], None)

    def prepare(self, features: torch.Tensor) -> Memory:
        return (features,)

    def init_state(self, memory: Memory) -> State:
        return (torch.zeros(memory[0].size(0), 1),)

    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, None]:
        self.steps += 1
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


class EndRamp(Decoder):
    """A real decoder whose <end> logit rises by `slope` per word and crosses 0 after `length` plus
    (the image's feature sum mod `spread`) words: captions of varied lengths per image, each beam
    ending when its own <end> overtakes its other words. The word clock rides in the state."""

    def __init__(self, inner: Decoder, length: float, slope: float, spread: float) -> None:
        super().__init__()
        self.inner, self.length, self.slope, self.spread = inner, length, slope, spread
        self.vocab_size, self.feature_dim = inner.vocab_size, inner.feature_dim

    def _start(self, features: torch.Tensor) -> torch.Tensor:
        return -(self.length + features.sum(dim=(1, 2)).remainder(self.spread))  # (B,)

    def _ramp(self, clock: torch.Tensor) -> torch.Tensor:
        """clock (...) -> (..., V) logit offsets, non-zero at <end> only."""
        return F.one_hot(torch.tensor(END, device=clock.device), self.vocab_size) * (self.slope * clock).unsqueeze(-1)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        out = self.inner(features, captions)
        k = captions.size(0) // features.size(0)
        steps = torch.arange(out.logits.size(1), device=features.device)  # (T,)
        clock = self._start(features).repeat_interleave(k).unsqueeze(1) + steps  # (B*k, T)
        return DecoderOutput(out.logits + self._ramp(clock), out.alphas)

    def prepare(self, features: torch.Tensor) -> Memory:
        return (*self.inner.prepare(features), self._start(features))

    def init_state(self, memory: Memory) -> State:
        return (*self.inner.init_state(memory[:-1]), memory[-1])

    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        *inner, clock = state
        logits, inner, alpha = self.inner.step(tokens, tuple(inner), memory[:-1])
        return logits + self._ramp(clock), (*inner, clock + 1), alpha


def _decoder(kind: str, seed: int = 0, length: float = 2.0, slope: float = 0.5, spread: float = 6.0) -> Decoder:
    """A small random decoder, peaked enough that beams disagree, whose <end> logit reaches 0 after
    `length` to `length + spread` words; captions end a few words later, when it overtakes the best word."""
    torch.manual_seed(seed)
    decoder = build_decoder(DecoderConfig(kind=kind, embed_dim=32, decoder_dim=32, attention_dim=32), VOCAB, FEATURES)
    with torch.no_grad():
        decoder.fc.weight.normal_(0, 0.6)
    return EndRamp(decoder, length, slope, spread).eval()


def _features(batch: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, P, FEATURES, generator=torch.Generator().manual_seed(seed)) * 2  # (B, P, C)


def _assert_long_and_varied(captions: list[Caption], max_len: int) -> None:
    """Beams only get reordered, and a reordering bug only shows, over long histories that end at
    different steps: mostly 5+ words, several lengths, all ended before max_len."""
    lengths = [len(c.tokens) for c in captions]
    assert sum(n >= 5 for n in lengths) >= 0.75 * len(lengths), lengths
    assert len(set(lengths)) >= 3, lengths
    assert max(lengths) < max_len, lengths


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
    decoder = _decoder("gru", length=1e4)
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
    decoder, features = _decoder(kind, length=1e4), _features(3)
    for beams in beam_search(decoder, features, START, END, beam_size=3, max_len=7, num_captions=3):
        assert all(len(c.tokens) == 7 for c in beams)
    assert all(len(c.tokens) == 7 for c in greedy_decode(decoder, features, START, END, max_len=7))


@pytest.mark.parametrize("kind", KINDS)
def test_beam1_equals_greedy(kind: str) -> None:
    decoder, features = _decoder(kind), _features(6)
    greedy = greedy_decode(decoder, features, START, END, max_len=12)
    beams = beam_search(decoder, features, START, END, beam_size=1, max_len=12)
    _assert_long_and_varied(greedy, max_len=12)
    for g, (b,) in zip(greedy, beams, strict=True):
        assert b.tokens == g.tokens
        assert b.score == pytest.approx(g.score, abs=1e-4)
        if g.alphas is not None:
            torch.testing.assert_close(b.alphas, g.alphas)


def _assert_batched_equals_per_image(decoder: Decoder, features: torch.Tensor, **kwargs: object) -> None:
    batched = beam_search(decoder, features, START, END, max_len=12, num_captions=2, **kwargs)
    _assert_long_and_varied([c for beams in batched for c in beams], max_len=12)
    for i in range(features.size(0)):
        (alone,) = beam_search(decoder, features[i : i + 1], START, END, max_len=12, num_captions=2, **kwargs)
        for a, b in zip(alone, batched[i], strict=True):
            assert a.tokens == b.tokens
            assert a.score == pytest.approx(b.score, abs=1e-4)
            if a.alphas is not None:
                torch.testing.assert_close(a.alphas, b.alphas, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_beam_search_equals_per_image(kind: str, beam_size: int) -> None:
    _assert_batched_equals_per_image(_decoder(kind), _features(6), beam_size=beam_size)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length_norm", [0.0, 0.7])
def test_beam_scores_and_attention_match_teacher_forced_rescoring(kind: str, length_norm: float) -> None:
    """Reordering beams must keep each caption's words, score, length and attention history together."""
    decoder, features = _decoder(kind), _features(4)
    results = beam_search(
        decoder, features, START, END, beam_size=4, max_len=15, num_captions=3, length_norm=length_norm
    )
    _assert_long_and_varied([c for beams in results for c in beams], max_len=15)
    for i, beams in enumerate(results):
        assert [c.score for c in beams] == sorted((c.score for c in beams), reverse=True)
        for caption in beams:
            score, alphas = _rescore(decoder, features[i], caption)  # tokens + <end>: all captions ended
            assert caption.score == pytest.approx(score / (len(caption.tokens) + 1) ** length_norm, abs=1e-4)
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


UNK = 3


def _prefers_unk(kind: str) -> Decoder:
    """The random decoder with <unk> made the likeliest word at most steps."""
    decoder = _decoder(kind)
    with torch.no_grad():
        decoder.inner.fc.bias[UNK] = 2.0
    return decoder


def test_banned_word_is_skipped_and_the_caption_keeps_the_model_score() -> None:
    """With A banned, greedy falls back on B <end>; beam search never keeps a beam through A."""
    a, b = 3, 4
    decoder = _markov(GREEDY_TRAP)
    (greedy,) = greedy_decode(decoder, ONE_IMAGE, START, END, max_len=3, banned=(a,))
    assert greedy.tokens == [b]
    assert greedy.score == pytest.approx(_sequence_log_prob(decoder, (b,)), abs=1e-5)
    (beams,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=4, max_len=3, num_captions=4, banned=(a,))
    for caption in beams:
        assert a not in caption.tokens
        assert caption.score == pytest.approx(_sequence_log_prob(decoder, tuple(caption.tokens)), abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_unk_is_emitted_unless_banned(kind: str) -> None:
    decoder, features = _prefers_unk(kind), _features(4)
    free = beam_search(decoder, features, START, END, beam_size=3, max_len=15)
    assert all(UNK in beams[0].tokens for beams in free)
    assert all(UNK in g.tokens for g in greedy_decode(decoder, features, START, END, max_len=15))
    banned = beam_search(decoder, features, START, END, beam_size=3, max_len=15, num_captions=3, banned=[UNK])
    greedy = greedy_decode(decoder, features, START, END, max_len=15, banned=[UNK])
    for i, (beams, g) in enumerate(zip(banned, greedy, strict=True)):
        for caption in [*beams, g]:
            assert UNK not in caption.tokens
            assert caption.score == pytest.approx(_rescore(decoder, features[i], caption)[0], abs=1e-4)


def test_caption_features_never_emits_unk_unless_allowed() -> None:
    vocab = Vocab([f"w{i}" for i in range(VOCAB - 4)])
    assert (vocab.start_id, vocab.end_id, vocab.unk_id, len(vocab)) == (START, END, UNK, VOCAB)
    decoder, features = _prefers_unk("gru"), _features(4)
    banned = caption_features(decoder, features, vocab, max_decode_len=15, batch_size=3, num_captions=3)
    assert not any(UNK in c.tokens for beams in banned for c in beams)
    allowed = caption_features(decoder, features, vocab, max_decode_len=15, batch_size=3, allow_unk=True)
    assert all(UNK in beams[0].tokens for beams in allowed)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_beam_search_with_a_banned_word_equals_per_image(kind: str) -> None:
    _assert_batched_equals_per_image(_prefers_unk(kind), _features(6), beam_size=3, banned=(UNK,))


def test_any_word_but_end_may_be_banned() -> None:
    """<pad> (0), <start>, <unk> and the last id are ordinary words to the search."""
    banned = (0, START, UNK, VOCAB - 1)
    for beams in beam_search(_decoder("gru"), _features(3), START, END, max_len=15, num_captions=3, banned=banned):
        assert not {t for c in beams for t in c.tokens} & set(banned)


@pytest.mark.parametrize("banned", [(END,), (VOCAB,), (-1,)])
def test_banning_end_or_an_unknown_id_raises_value_error(banned: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"cannot ban word ids \[{banned[0]}\]"):
        beam_search(_decoder("gru"), _features(1), START, END, banned=banned)
    with pytest.raises(ValueError, match="cannot ban"):
        greedy_decode(_decoder("gru"), _features(1), START, END, banned=banned)


def test_beam_as_wide_as_the_words_left_is_allowed_and_wider_raises_value_error() -> None:
    (beams,) = beam_search(_decoder("gru"), _features(1), START, END, beam_size=VOCAB, num_captions=VOCAB, max_len=2)
    assert len(beams) == VOCAB
    beam_search(_decoder("gru"), _features(1), START, END, beam_size=VOCAB - 1, max_len=2, banned=(UNK,))
    with pytest.raises(ValueError, match=r"beam_size \(20\) <= vocab size less banned words \(19\)"):
        beam_search(_decoder("gru"), _features(1), START, END, beam_size=VOCAB, banned=(UNK,))


def test_length_norm_divides_by_each_caption_own_length_after_beams_change_places() -> None:
    """B <end> ends at step 1 in beam 2 and waits there a step; then A Y Z splits into two likelier
    beams that push it to beam 3. Each caption must still be divided by its own length."""
    a, b, y, z, c, d = 3, 4, 5, 6, 7, 8
    decoder = _markov({START: {a: 0.7, b: 0.2}, a: {y: 0.95}, y: {z: 0.95}, z: {c: 0.5, d: 0.45}}, vocab=9)
    expected = [(a, y, z, c), (a, y, z, d), (b,)]
    (beams,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=3, max_len=6, num_captions=3, length_norm=1.0)
    assert [tuple(c.tokens) for c in beams] == expected
    norm = [_sequence_log_prob(decoder, words) / (len(words) + 1) for words in expected]
    assert [c.score for c in beams] == pytest.approx(norm, abs=1e-5)


@pytest.mark.parametrize("search", ["beam", "greedy"])
def test_search_stops_once_every_caption_has_ended(search: str) -> None:
    """A B <end> and every other beam end by step 3; the remaining 47 steps are never run."""
    decoder = _markov({START: {3: 0.9}, 3: {4: 0.9}})
    if search == "beam":
        (beams,) = beam_search(decoder, ONE_IMAGE, START, END, beam_size=2, max_len=50)
        assert beams[0].tokens == [3, 4]
    else:
        assert greedy_decode(decoder, ONE_IMAGE, START, END, max_len=50)[0].tokens == [3, 4]
    assert decoder.steps == 3


def test_defaults_are_the_reference_beam_of_3_and_50_words() -> None:
    decoder, features = _decoder("gru", length=1e4), _features(1)
    (beams,) = beam_search(decoder, features, START, END, num_captions=3)
    assert [len(c.tokens) for c in beams] == [50, 50, 50]
    with pytest.raises(ValueError, match=r"beam_size \(3\)"):
        beam_search(decoder, features, START, END, num_captions=4)
    assert len(greedy_decode(decoder, features, START, END)[0].tokens) == 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_search_on_gpu_matches_cpu(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor the search makes must be on the features' device."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # GRU: full float32, as on CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    def search(decoder: Decoder, features: torch.Tensor) -> list[Caption]:
        beams = beam_search(decoder, features, START, END, max_len=15, num_captions=2, banned=(UNK,))
        return [*itertools.chain(*beams), *greedy_decode(decoder, features, START, END, max_len=15, banned=(UNK,))]

    decoder, features = _decoder(kind), _features(4)
    on_cpu = search(decoder, features)
    for a, b in zip(on_cpu, search(decoder.cuda(), features.cuda()), strict=True):
        assert a.tokens == b.tokens
        assert a.score == pytest.approx(b.score, abs=1e-3)
        if a.alphas is not None:
            torch.testing.assert_close(a.alphas, b.alphas, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_captions_of_no_words(kind: str) -> None:
    """<end> first on every image: empty captions, scored log p(<end>), with no attention rows."""
    decoder, features = _decoder(kind, length=-1e4), _features(3)
    beams = beam_search(decoder, features, START, END)
    for caption in [*greedy_decode(decoder, features, START, END), *itertools.chain(*beams)]:
        assert caption.tokens == []
        assert caption.score == pytest.approx(0.0, abs=1e-4)
        if kind == "attention":
            assert caption.alphas is not None and caption.alphas.shape == (0, P)
        else:
            assert caption.alphas is None
