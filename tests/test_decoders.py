"""Decoders: shapes, teacher forcing equals stepping, k beams per image, loss masking, gradients,
pooling features to the decoder's grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raycap.data.vocab import Vocab
from raycap.models.checkpoint import CaptionModel, load_checkpoint, save_checkpoint
from raycap.models.decoders import (
    AttentionDecoder,
    Decoder,
    DecoderConfig,
    DecoderOutput,
    GRUDecoder,
    build_decoder,
    caption_loss,
    trim_padding,
)
from raycap.models.encoder import pool_to_grid
from raycap.models.encoder_config import EncoderConfig

VOCAB, FEATURES, P, PAD = 20, 16, 9, 0
KINDS = ["gru", "attention"]


def _decoder(kind: str, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(kind=kind, embed_dim=32, decoder_dim=32, attention_dim=32)
    return build_decoder(cfg, VOCAB, FEATURES).eval()


def _features(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, P, FEATURES, generator=torch.Generator().manual_seed(seed))  # (B, P, C)


def _captions(batch: int = 3, length: int = 7, seed: int = 2) -> torch.Tensor:
    """<start> w... <end> <pad>...: (B, length), row b has length - b - 2 words."""
    words = torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    words[:, 0] = 1
    for b in range(batch):
        end = length - 1 - b
        words[b, end] = 2
        words[b, end + 1 :] = PAD
    return words


@pytest.mark.parametrize("kind", KINDS)
def test_build_decoder_picks_class(kind: str) -> None:
    assert isinstance(_decoder(kind), {"gru": GRUDecoder, "attention": AttentionDecoder}[kind])


def test_unknown_decoder_kind_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown decoder 'lstm'"):
        DecoderConfig(kind="lstm")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_logits_are_batch_time_vocab(kind: str) -> None:
    out = _decoder(kind)(_features(), _captions(length=7))
    assert out.logits.shape == (3, 6, VOCAB)


def test_attention_weights_are_distributions_over_positions() -> None:
    out = _decoder("attention")(_features(), _captions(length=7))
    assert out.alphas is not None and out.alphas.shape == (3, 6, P)
    assert (out.alphas >= 0).all()
    torch.testing.assert_close(out.alphas.sum(dim=2), torch.ones(3, 6))


def test_gru_returns_no_attention() -> None:
    assert _decoder("gru")(_features(), _captions()).alphas is None


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forcing_equals_stepping(kind: str) -> None:
    decoder, features, captions = _decoder(kind), _features(), _captions()
    out = decoder(features, captions)
    memory = decoder.prepare(features)
    state = decoder.init_state(memory)
    for t in range(captions.size(1) - 1):
        logits, state, alpha = decoder.step(captions[:, t], state, memory)
        torch.testing.assert_close(logits, out.logits[:, t], rtol=1e-5, atol=1e-5)
        if out.alphas is not None:
            torch.testing.assert_close(alpha, out.alphas[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_step_with_k_beams_per_image_equals_repeated_memory(kind: str) -> None:
    """State rows b*k..b*k+k-1 belong to image b; the result must not depend on sharing memory."""
    decoder, batch, k = _decoder(kind), 3, 4
    memory = decoder.prepare(_features(batch))
    generator = torch.Generator().manual_seed(3)
    state = tuple(torch.randn(batch * k, *s.shape[1:], generator=generator) for s in decoder.init_state(memory))
    tokens = torch.randint(0, VOCAB, (batch * k,), generator=generator)
    shared = decoder.step(tokens, state, memory)
    repeated = decoder.step(tokens, state, tuple(m.repeat_interleave(k, dim=0) for m in memory))
    torch.testing.assert_close(shared[0], repeated[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(shared[1], repeated[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if kind == "attention":
        assert shared[2].shape == (batch * k, P)
        torch.testing.assert_close(shared[2], repeated[2], rtol=1e-5, atol=1e-5)


def test_attention_context_enters_only_through_gate() -> None:
    """With the f_beta gate shut, features that keep the same mean (so the same initial state) give
    the same words; with it open they do not."""
    decoder, captions = _decoder("attention"), _captions()
    features = _features()
    shuffled = features[:, torch.randperm(P, generator=torch.Generator().manual_seed(4))]  # same mean, new layout
    shuffled = shuffled + torch.randn(shuffled.shape, generator=torch.Generator().manual_seed(5))
    shuffled = shuffled - shuffled.mean(dim=1, keepdim=True) + features.mean(dim=1, keepdim=True)
    with torch.no_grad():
        decoder.f_beta.weight.zero_()
        decoder.f_beta.bias.fill_(-1e4)  # sigmoid -> 0
        torch.testing.assert_close(decoder(features, captions).logits, decoder(shuffled, captions).logits)
        decoder.f_beta.bias.fill_(1e4)  # sigmoid -> 1
        assert not torch.allclose(decoder(features, captions).logits, decoder(shuffled, captions).logits, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_ignores_logits_at_pad_targets(kind: str) -> None:
    decoder, captions = _decoder(kind), _captions()
    out = decoder(_features(), captions)
    pad = captions[:, 1:] == PAD  # (B, T)
    assert pad.any()
    noisy = out.logits.clone()
    noisy[pad] = torch.randn(int(pad.sum()), VOCAB) * 100
    alphas = None if out.alphas is None else out.alphas.clone()
    if alphas is not None:
        alphas[pad] = torch.rand(int(pad.sum()), P)
    torch.testing.assert_close(
        caption_loss(DecoderOutput(noisy, alphas), captions, PAD), caption_loss(out, captions, PAD)
    )


def test_gru_loss_is_cross_entropy_over_non_pad_targets() -> None:
    captions = _captions()
    out = _decoder("gru")(_features(), captions)
    targets = captions[:, 1:]
    keep = targets != PAD
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    total, ce = caption_loss(out, captions, PAD)
    torch.testing.assert_close(ce, expected)
    torch.testing.assert_close(total, expected)


def _alpha_output(alphas: torch.Tensor) -> DecoderOutput:
    batch, steps, _ = alphas.shape
    return DecoderOutput(torch.zeros(batch, steps, VOCAB), alphas)


def test_doubly_stochastic_term_is_zero_when_every_position_is_attended_once() -> None:
    """Captions of 3 words + <end> over P=4 positions, each position attended once in total over the
    valid steps; the padded steps attend anything and must not count."""
    captions = torch.tensor([[1, 5, 6, 7, 2, PAD, PAD], [1, 8, 9, 10, 2, PAD, PAD]])  # (2, 7): 4 valid steps
    alphas = torch.full((2, 6, 4), 0.25)  # (B, T, P)
    alphas[0, :4] = torch.eye(4)
    alphas[1, :4] = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5]])
    total, ce = caption_loss(_alpha_output(alphas), captions, PAD, alpha_c=1.0)
    torch.testing.assert_close(total, ce)


def test_doubly_stochastic_term_penalises_uneven_attention() -> None:
    captions = torch.tensor([[1, 5, 6, 2, PAD]])  # 3 valid steps over P=3 positions
    alphas = torch.zeros(1, 4, 3)
    alphas[0, :3, 0] = 1.0  # every step looks at position 0: sums (3, 0, 0)
    alphas[0, 3] = torch.tensor([0.0, 1.0, 0.0])  # pad step would even it out if it were counted
    total, ce = caption_loss(_alpha_output(alphas), captions, PAD, alpha_c=0.5)
    expected = 0.5 * ((1 - 3) ** 2 + 1 + 1) / 3
    torch.testing.assert_close(total - ce, torch.tensor(expected))
    total0, ce0 = caption_loss(_alpha_output(alphas), captions, PAD, alpha_c=0.0)
    torch.testing.assert_close(total0, ce0)


def test_trim_padding_drops_all_pad_columns_only() -> None:
    captions = torch.tensor([[1, 5, 2, PAD, PAD, PAD], [1, 5, 6, 7, 2, PAD]])
    torch.testing.assert_close(trim_padding(captions, PAD), captions[:, :5])
    full = torch.tensor([[1, 5, 6, 2]])
    torch.testing.assert_close(trim_padding(full, PAD), full)


@pytest.mark.parametrize("kind", KINDS)
def test_trimmed_captions_give_same_loss(kind: str) -> None:
    decoder, features = _decoder(kind), _features()
    captions = torch.cat([_captions(), torch.full((3, 4), PAD)], dim=1)  # extra all-pad columns
    full = caption_loss(decoder(features, captions), captions, PAD)
    trimmed = trim_padding(captions, PAD)
    assert trimmed.size(1) < captions.size(1)
    torch.testing.assert_close(caption_loss(decoder(features, trimmed), trimmed, PAD), full)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    decoder = _decoder(kind).train()
    captions = _captions()
    total, _ = caption_loss(decoder(_features(), captions), captions, PAD)
    total.backward()
    for name, param in decoder.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_active_only_in_train_mode(kind: str) -> None:
    decoder, features, captions = _decoder(kind), _features(), _captions()
    torch.testing.assert_close(decoder(features, captions).logits, decoder(features, captions).logits)
    decoder.train()
    assert not torch.allclose(decoder(features, captions).logits, decoder(features, captions).logits)


# --- pooling to the decoder's grid --------------------------------------------------------------


def _gridded_and_plain(kind: str, grid: int) -> tuple[Decoder, Decoder]:
    """The same weights twice: one decoder pools its features to grid x grid, the other takes them as given."""
    gridded = build_decoder(DecoderConfig(kind=kind, embed_dim=32, decoder_dim=32, attention_dim=32), VOCAB, FEATURES, grid)
    plain = _decoder(kind)
    plain.load_state_dict(gridded.state_dict())
    return gridded.eval(), plain


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_pools_native_features_to_its_grid_on_arrival(kind: str) -> None:
    """3x3 features (as stored) into a grid-2 decoder = their 2x2 pooling into the same weights, in
    teacher forcing and in the memory that greedy and beam search step over. (3 -> 2, as pooling 2 ->
    3 keeps the mean, which is all the GRU reads.)"""
    gridded, plain = _gridded_and_plain(kind, grid=2)
    native, captions = _features(), _captions()  # (B, 3*3, C)
    pooled = pool_to_grid(native, 2)  # (B, 2*2, C)
    out, expected = gridded(native, captions), plain(pooled, captions)
    torch.testing.assert_close(out.logits, expected.logits)
    assert not torch.allclose(out.logits, plain(native, captions).logits)
    if kind == "attention":
        assert out.alphas is not None and out.alphas.shape == (3, 6, 2 * 2)
        torch.testing.assert_close(out.alphas, expected.alphas)
    for got, want in zip(gridded.prepare(native), plain.prepare(pooled), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_uses_features_at_its_grid_unchanged(kind: str) -> None:
    gridded, plain = _gridded_and_plain(kind, grid=3)
    features, captions = _features(), _captions()  # P = 9: already 3x3
    assert gridded.at_grid(features) is features
    torch.testing.assert_close(gridded(features, captions).logits, plain(features, captions).logits)


def test_checkpoint_loads_a_decoder_that_pools_to_the_encoders_grid(tmp_path: Path) -> None:
    encoder_cfg = EncoderConfig("resnet18", "none", grid=3, image_size=64)  # native grid 2
    decoder_cfg = DecoderConfig(embed_dim=32, decoder_dim=32, attention_dim=32)
    vocab = Vocab(["a", "red", "circle"])
    decoder = build_decoder(decoder_cfg, len(vocab), encoder_cfg.feature_dim, encoder_cfg.grid)
    save_checkpoint(tmp_path, CaptionModel(decoder, vocab, encoder_cfg, decoder_cfg))
    loaded = load_checkpoint(tmp_path).decoder
    assert loaded.grid == 3
    assert loaded.prepare(torch.zeros(1, 2 * 2, encoder_cfg.feature_dim))[0].shape == (1, 3 * 3, encoder_cfg.feature_dim)


# --- behaviours the mutation tests found unchecked (`mutmut run`, see pyproject.toml) ---------------


@pytest.mark.parametrize("kind", KINDS)
def test_k_captions_per_image_read_that_image(kind: str) -> None:
    """Captions grouped k per image (as training feeds them) = each image repeated for its captions."""
    decoder, features, k = _decoder(kind), _features(3), 2
    captions = _captions(batch=3 * k)  # (B*k, T+1): rows 2b, 2b+1 describe image b
    shared = decoder(features, captions)
    repeated = decoder(features.repeat_interleave(k, dim=0), captions)
    torch.testing.assert_close(shared.logits, repeated.logits, rtol=1e-5, atol=1e-5)
    if kind == "attention":
        torch.testing.assert_close(shared.alphas, repeated.alphas, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_captions_not_a_multiple_of_the_images_raise_value_error(kind: str) -> None:
    with pytest.raises(ValueError, match="5 captions for 3 images: need the same number per image"):
        _decoder(kind)(_features(3), _captions(batch=5))


def test_attention_is_additive_over_features_and_hidden_state() -> None:
    """Bahdanau: alpha = softmax_p(w . relu(W_f f_p + W_h h)), context = sum_p alpha_p f_p."""
    attention = _decoder("attention").attention
    features = _features(2)  # (B, P, C)
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))  # (B, D)
    with torch.no_grad():
        context, alpha = attention(features, attention.encoder_att(features), h)
        hidden = torch.relu(attention.encoder_att(features) + attention.decoder_att(h).unsqueeze(1))  # (B, P, A)
        expected = torch.softmax(attention.full_att(hidden).squeeze(2), dim=1)  # (B, P)
    torch.testing.assert_close(alpha, expected)
    torch.testing.assert_close(context, (expected.unsqueeze(2) * features).sum(dim=1))


@pytest.mark.parametrize("signs", ["mixed", "positive", "negative"])
def test_search_attention_equals_the_textbook_form(signs: str) -> None:
    """`Attention.step` (L1 distances to the `prepare`d image side) = `forward`, for full_att weights
    of both signs and of one sign only (one of the two distances is then over no dimensions)."""
    attention, k = _decoder("attention").attention, 3
    with torch.no_grad():
        if signs != "mixed":
            attention.full_att.weight.abs_().mul_(1.0 if signs == "positive" else -1.0)
    positive = int((attention.full_att.weight > 0).sum())  # of A = 32 dimensions
    assert positive in {"mixed": range(1, 32), "positive": [32], "negative": [0]}[signs]
    features = _features(2)  # (B, P, C)
    h = torch.randn(2 * k, 32, generator=torch.Generator().manual_seed(7))  # (B*k, D)
    with torch.no_grad():
        expected = attention(features, attention.encoder_att(features), h)
        found = attention.step(features, *attention.prepare(features), h)
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_and_output_layer_start_as_in_the_reference(kind: str) -> None:
    """Uniform(-0.1, 0.1) embeddings and output weights, zero output bias."""
    decoder = _decoder(kind)
    for weights in (decoder.embedding.weight.detach(), decoder.fc.weight.detach()):
        assert -0.1 <= float(weights.min()) < -0.09 and 0.09 < float(weights.max()) <= 0.1
    assert not decoder.fc.bias.any()


def test_doubly_stochastic_weight_defaults_to_the_references_1() -> None:
    captions = torch.tensor([[1, 5, 6, 2, PAD]])  # 3 valid steps over P=3 positions
    alphas = torch.zeros(1, 4, 3)
    alphas[0, :3, 0] = 1.0  # sums (3, 0, 0): penalty ((1 - 3)^2 + 1 + 1) / 3 = 2
    total, ce = caption_loss(_alpha_output(alphas), captions, PAD)
    torch.testing.assert_close(total - ce, torch.tensor(2.0))
