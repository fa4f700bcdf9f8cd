"""Each attention option against its definition, computed independently here."""

import math

import pytest
import torch

from attention_simulator.attention import Attention, AttentionConfig, RotaryEmbedding, alibi_slopes
from attention_simulator.attention.masks import Padding
from attention_simulator.attention.norms import make_norm
from attention_simulator.errors import ConfigError
from attention_simulator.models.block import TransformerBlock
from flash_sigmoid.reference import attention_mask, keys_per_row

from .. import brute_force

BACKENDS = ["softmax", "sigmoid", "flash_softmax", "flash_sigmoid"]


# ---- RoPE ---------------------------------------------------------------------------------------


def scores(q, k):
    return torch.einsum("bqhd,bkhd->bhqk", q, k)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, base=100.0)
    q, k = torch.randn(2, 6, 3, 16), torch.randn(2, 6, 3, 16)
    at_zero = scores(rope(q), rope(k))
    shifted = scores(rope(q, offset=37), rope(k, offset=37))  # every position + 37
    torch.testing.assert_close(shifted, at_zero, rtol=1e-4, atol=1e-4)
    assert (at_zero - scores(q, k)).abs().max() > 0.1  # and RoPE does change the scores


def test_rope_rotates_along_the_sequence_axis_of_b_t_h_d():
    """The same vector at every position and head: rotated vectors differ across positions
    (T is dim 1) but not across heads (H is dim 2) -- a layout mix-up fails here."""
    rope = RotaryEmbedding(8)
    x = torch.randn(8).expand(1, 5, 4, 8).clone()
    out = rope(x)
    assert torch.allclose(out[:, :, 0], out[:, :, 3])
    assert not torch.allclose(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 is not rotated
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps norms


def test_partial_rope_leaves_the_other_dims_alone():
    rope = RotaryEmbedding(16, fraction=0.25)
    x = torch.randn(1, 7, 2, 16)
    out = rope(x)
    assert torch.equal(out[..., 4:], x[..., 4:]) and not torch.allclose(out[..., :4], x[..., :4])


# ---- ALiBi ----------------------------------------------------------------------------------------


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    twelve = alibi_slopes(12)  # 8 from the power of two below, then every other one of 16
    torch.testing.assert_close(twelve[:8], alibi_slopes(8))
    torch.testing.assert_close(twelve[8:], alibi_slopes(16)[0::2][:4])


MASK_CASES = [(False, (-1, -1)), (True, (-1, -1)), (True, (2, 0)), (False, (1, 3)), (True, (3, -1))]


@pytest.mark.parametrize("tq, tk", [(6, 6), (4, 9), (9, 4)])
@pytest.mark.parametrize("causal, window", MASK_CASES)
def test_mask_and_alibi_against_brute_force(tq, tk, causal, window):
    """Bottom-right alignment, windows, ALiBi's |i + Tk − Tq − j| and per-sequence padding."""
    slopes = alibi_slopes(4)
    q_lengths, k_lengths = torch.tensor([tq, max(1, tq - 3)]), torch.tensor([tk, max(1, tk - 2)])
    allowed, alibi = attention_mask(tq, tk, causal, window, slopes, q_lengths, k_lengths)  # (B, 1, Tq, Tk)
    for b in range(2):
        expected, distance = brute_force.pair_tables(tq, tk, int(q_lengths[b]), int(k_lengths[b]), causal, window)
        real_rows = torch.arange(tq) < q_lengths[b]  # what a padded query attends is not defined
        assert torch.equal(allowed[b, 0][real_rows], expected[real_rows])
        torch.testing.assert_close(alibi[b], -slopes[:, None, None] * distance.float())


# ---- masks and −log n ------------------------------------------------------------------------------


@pytest.mark.parametrize("causal, window", MASK_CASES)
def test_keys_per_row_counts_the_mask(causal, window):
    lengths_q, lengths_k = torch.tensor([9, 4, 1]), torch.tensor([9, 6, 3])
    ours = keys_per_row(9, 9, causal, window, lengths_q, lengths_k)
    for b in range(3):
        q_len = int(lengths_q[b])
        counted = brute_force.keys_attended(9, 9, q_len, int(lengths_k[b]), causal, window)
        assert ours[b, :q_len].tolist() == counted[:q_len]


def mass_at_zero_logits(bias_n, causal, lengths=None):
    """Σ_j p_ij with q·k = 0, using the module's own bias."""
    attn = Attention(16, 2, AttentionConfig(backend="sigmoid", sigmoid_bias="auto", bias_n=bias_n), causal=causal)
    bias = attn.sigmoid_bias(10, 10, lengths, lengths)
    zeros = torch.zeros(1 if lengths is None else len(lengths), 10, 2, 8)
    _, mass, _ = brute_force.attention(zeros, zeros, zeros, activation="sigmoid", bias=bias, causal=causal,
                                       q_lengths=lengths, k_lengths=lengths)  # fmt: skip
    return mass[:, 0].float()  # (B, Tq)


def test_minus_log_n_gives_each_row_mass_near_one():
    n = torch.arange(1, 11).float()
    full = mass_at_zero_logits("max_length", causal=False)
    torch.testing.assert_close(full, torch.full_like(full, 10 / 11))  # every row sees all n keys
    per_row = mass_at_zero_logits("per_row", causal=True)
    torch.testing.assert_close(per_row[0], n / (n + 1))  # row i sees i + 1 keys, b = −log(i + 1)
    max_len = mass_at_zero_logits("max_length", causal=True)
    torch.testing.assert_close(max_len[0], n / 11)  # b = −log 10 for every row: early rows starve
    padded = mass_at_zero_logits("max_length", causal=False, lengths=torch.tensor([10, 4]))
    torch.testing.assert_close(padded[1, :4], torch.full((4,), 4 / 5))  # n = the true length


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_at_real_positions_ignore_extra_padding(backend):
    sigmoid = "sigmoid" in backend
    config = AttentionConfig(backend=backend, position="alibi", window=4, sigmoid_bias="auto" if sigmoid else None,
                             num_kv_heads=2)  # fmt: skip
    torch.manual_seed(0)
    attn = Attention(32, 4, config, causal=True).eval()
    x, lengths = torch.randn(2, 9, 32), torch.tensor([9, 5])
    out = attn(x, padding=Padding.of(lengths, 9))
    longer = attn(torch.cat([x, 100 * torch.randn(2, 6, 32)], dim=1), padding=Padding.of(lengths, 15))
    torch.testing.assert_close(longer[0, :9], out[0, :9], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(longer[1, :5], out[1, :5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length_norm, power", [("n", 1.0), ("sqrt_n", 0.5)])
def test_length_norm_divides_each_row_by_its_key_count(length_norm, power):
    torch.manual_seed(0)
    plain = Attention(16, 2, AttentionConfig(backend="sigmoid", sigmoid_bias=-1.0), causal=True)
    normed = Attention(
        16, 2, AttentionConfig(backend="sigmoid", sigmoid_bias=-1.0, length_norm=length_norm), causal=True
    )
    normed.load_state_dict(plain.state_dict())
    x, lengths = torch.randn(2, 7, 16), torch.tensor([7, 3])
    captured = {}
    plain.proj.register_forward_hook(lambda m, i, o: captured.setdefault("plain", i[0]))
    normed.proj.register_forward_hook(lambda m, i, o: captured.setdefault("normed", i[0]))
    plain(x, padding=Padding.of(lengths, 7)), normed(x, padding=Padding.of(lengths, 7))
    n = torch.arange(1, 8).float().clamp(max=torch.tensor([[7], [3]]))  # causal: row i attends min(i + 1, L)
    torch.testing.assert_close(captured["normed"], captured["plain"] / n[..., None] ** power)


def test_temperature_scales_the_logits():
    torch.manual_seed(0)
    config = AttentionConfig(backend="sigmoid", sigmoid_bias=0.0, temperature="per_head")
    attn = Attention(16, 2, config)
    x = torch.randn(1, 5, 16)
    base = attn(x)
    with torch.no_grad():
        attn.log_temperature.fill_(math.log(2.0))
    doubled = attn(x)
    attn.qkv.weight.data[:16] *= 2  # doubling q by hand is the same as temperature 2
    with torch.no_grad():
        attn.qkv.bias.data[:16] *= 2
        attn.log_temperature.zero_()
    torch.testing.assert_close(attn(x), doubled)
    assert not torch.allclose(base, doubled)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_output_gate_multiplies_each_head_by_a_sigmoid_of_the_input(backend, gate):
    """proj(attention·V ⊙ σ(x W_g + b_g)), written out: the ungated twin's attention·V (its
    projection taken off), each head's channels times that head's gate (headwise) or their own."""
    torch.manual_seed(0)
    gated = Attention(16, 4, AttentionConfig(backend=backend, gate=gate), causal=True)
    twin = Attention(16, 4, AttentionConfig(backend=backend), causal=True)
    twin.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    twin.proj = torch.nn.Identity()
    x = torch.randn(2, 5, 16)
    values = twin(x)  # (B, T, H·D)
    w, b = gated.gate.proj.weight, gated.gate.proj.bias
    expected = torch.empty_like(values)
    for i in range(16):  # channel i belongs to head i // 4
        unit = i // 4 if gate == "headwise" else i
        expected[..., i] = values[..., i] / (1 + torch.exp(-(x @ w[unit] + b[unit])))
    assert w.shape == (4 if gate == "headwise" else 16, 16)
    torch.testing.assert_close(gated(x), gated.proj(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["softmax", "flash_softmax"])
def test_off_by_one_softmax_gives_the_sink_one_share(backend):
    """sink=zero: 1 + Σ exp in each row's denominator. With every logit 0 (queries zeroed), causal
    row i averages values 0..i with weight 1 / (i + 2): the sink takes the other share."""
    torch.manual_seed(0)
    attn = Attention(16, 2, AttentionConfig(backend=backend, sink="zero"), causal=True)
    attn.proj = torch.nn.Identity()
    with torch.no_grad():
        attn.qkv.weight[:16], attn.qkv.bias[:16] = 0, 0  # q = 0
    x = torch.randn(1, 5, 16)
    values = x @ attn.qkv.weight[32:].T + attn.qkv.bias[32:]  # (1, T, C)
    expected = torch.stack([values[0, : i + 1].sum(0) / (i + 2) for i in range(5)])
    torch.testing.assert_close(attn(x)[0], expected)


# ---- norms and block shapes --------------------------------------------------------------------------


def test_rmsnorm_normalises_the_last_dimension():
    norm = make_norm("rmsnorm", 6, "test")
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6) * 5
    expected = x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt() * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("placement", ["pre", "post", "hybrid"])
def test_block_norm_placements(placement):
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, norm=placement, norm_type="rmsnorm", layer_scale=0.5).eval()
    x = torch.randn(2, 5, 16)
    n = {
        k: getattr(block, k) for k in ("norm1", "post_norm1", "residual_norm1", "norm2", "post_norm2", "residual_norm2")
    }
    rms = torch.nn.RMSNorm
    if placement == "pre":
        h = x + 0.5 * block.attn(n["norm1"](x))
        expected = h + 0.5 * block.mlp(n["norm2"](h))
    elif placement == "post":
        h = n["residual_norm1"](x + 0.5 * block.attn(x))
        expected = n["residual_norm2"](h + 0.5 * block.mlp(h))
    else:
        h = x + 0.5 * n["post_norm1"](block.attn(n["norm1"](x)))
        expected = h + 0.5 * n["post_norm2"](block.mlp(n["norm2"](h)))
    assert sum(isinstance(m, rms) for m in n.values()) == {"pre": 2, "post": 2, "hybrid": 4}[placement]
    torch.testing.assert_close(block(x), expected)


# ---- heads and cross-attention -------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_and_multi_query_heads_share_keys(kv_heads):
    attn = Attention(32, 4, AttentionConfig(num_kv_heads=kv_heads))
    assert attn.qkv.out_features == 32 + 2 * kv_heads * 8


@pytest.mark.parametrize("naive, fused", [("softmax", "flash_softmax"), ("sigmoid", "flash_sigmoid")])
def test_cross_attention_with_other_lengths_and_widths(naive, fused):
    torch.manual_seed(0)
    kw = dict(sigmoid_bias="auto") if naive == "sigmoid" else {}
    a = Attention(32, 4, AttentionConfig(backend=naive, num_kv_heads=2, **kw), kv_dim=48)
    b = Attention(32, 4, AttentionConfig(backend=fused, num_kv_heads=2, **kw), kv_dim=48)
    b.load_state_dict(a.state_dict())
    x, context, context_lengths = torch.randn(2, 5, 32), torch.randn(2, 7, 48), torch.tensor([7, 3])
    padding = Padding.of(context_lengths, 7)
    out = a(x, context=context, context_padding=padding)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(b(x, context=context, context_padding=padding), out, rtol=1e-5, atol=1e-6)
    junk = torch.cat([context[1:, :3], 50 * torch.randn(1, 4, 48)], dim=1)  # keys beyond the length are ignored
    torch.testing.assert_close(a(x[1:], context=junk, context_padding=Padding.of(context_lengths[1:], 7)), out[1:])


# ---- options a backend cannot honour ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(backend="softmax", length_norm="n"),
            r"'softmax' cannot honour length_norm; .*\['flash_sigmoid', 'sigmoid'\]",
        ),
        (dict(backend="flash_softmax", learnable_bias="scalar"), r"cannot honour sigmoid_bias"),
        (dict(backend="flash_sigmoid", sigmoid_bias="auto", bias_n="per_row"), r"per_row_bias; .*\['sigmoid'\]"),
        (dict(backend="sigmoid", sigmoid_bias=1.0, bias_n="per_row"), r"bias_n=per_row only applies"),
        (dict(position="absolute"), r"attention.position='absolute'"),
        (dict(window=-3), r"window=-3"),
        (dict(backend="flash_sigmoid", sink="learned"), r"cannot honour sink \(.*sigmoid attention does not have\)"),
        (dict(gate="per_head"), r"attention.gate='per_head': choose one of \['none', 'headwise', 'elementwise'\]"),
    ],
)
def test_impossible_options_are_refused_at_construction(config, message):
    with pytest.raises(ConfigError, match=message):
        AttentionConfig(**config)


def test_flash_sigmoid_attention_dropout_in_training_only():
    torch.manual_seed(0)
    dropped = Attention(32, 4, AttentionConfig(backend="flash_sigmoid", sigmoid_bias=-2.0, attn_drop=0.5))
    plain = Attention(32, 4, AttentionConfig(backend="flash_sigmoid", sigmoid_bias=-2.0))
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(2, 9, 32)
    assert not torch.allclose(dropped(x), dropped(x))  # a fresh pattern each call
    dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))


def test_structural_mistakes_are_refused():
    with pytest.raises(ConfigError, match="num_kv_heads=3 must divide num_heads=4"):
        Attention(32, 4, AttentionConfig(num_kv_heads=3))
    with pytest.raises(ConfigError, match="rope is for self-attention"):
        Attention(32, 4, AttentionConfig(position="rope"), kv_dim=16)
    with pytest.raises(ConfigError, match="qk_norm='batchnorm'"):
        Attention(32, 4, AttentionConfig(qk_norm="batchnorm"))
