"""A module on given backends against the same module on the brute force of `tests/brute_force.py`
in fp64, by FlashAttention's criterion: the reference recomputes masks, ALiBi distances and the
sigmoid bias (−log n per sequence or per row, plus the learned offset) itself. test_parity_matrix.py
runs it over every combination of options on CPU, tests/gpu on CUDA."""

import copy
import math

import torch

from attention_simulator.attention import Attention, AttentionConfig
from attention_simulator.attention.masks import Padding

from .. import brute_force
from ..flash_sigmoid.helpers import criterion


def reference_bias(module, batch, tq, tk, q_lengths, k_lengths):
    """The sigmoid bias per sequence, head and row (B, H, Tq), from the module's config."""
    config, heads = module.config, module.num_heads
    window = (-1, -1) if config.window is None else (config.window, 0 if module.causal else config.window)
    bias = torch.zeros(batch, heads, tq, dtype=torch.float64)
    for b in range(batch):
        q_len = tq if q_lengths is None else int(q_lengths[b])
        k_len = tk if k_lengths is None else int(k_lengths[b])
        if config.sigmoid_bias == "auto" and config.bias_n == "per_row":
            counts = brute_force.keys_attended(tq, tk, q_len, k_len, module.causal, window)
            bias[b] = torch.tensor([-math.log(max(n, 1)) for n in counts], dtype=torch.float64)
        elif config.sigmoid_bias == "auto":
            bias[b] = -math.log(k_len)
        elif config.sigmoid_bias is not None:
            bias[b] = float(config.sigmoid_bias)
    if module.bias_offset is not None:
        bias = bias + module.bias_offset.double().reshape(1, -1, 1)
    return bias


def use_brute_force(module: Attention) -> Attention:
    """The module with its backend replaced by the brute force (computing in the module's dtype)."""
    activation = "sigmoid" if "sigmoid" in module.config.backend else "softmax"
    window = (
        (-1, -1)
        if module.config.window is None
        else (module.config.window, 0 if module.causal else module.config.window)
    )

    def backend(q, k, v, spec):
        bias = reference_bias(module, q.shape[0], q.shape[1], k.shape[1], spec.q_lengths, spec.k_lengths)
        out, _, _ = brute_force.attention(
            q, k, v, activation=activation, scale=spec.scale, bias=bias.to(q.dtype), causal=module.causal,
            window=window, alibi_slopes=spec.alibi_slopes, q_lengths=spec.q_lengths, k_lengths=spec.k_lengths,
            sink=spec.sink, dtype=q.dtype,
        )  # fmt: skip
        return out

    module.backend = backend
    return module


def run(module, x, lengths, context=None, context_lengths=None):
    """Output at real positions and the gradients of a loss that only sees real positions."""
    where = dict(device=next(module.parameters()).device, dtype=next(module.parameters()).dtype)
    x = x.detach().to(**where).requires_grad_()
    lengths = None if lengths is None else lengths.to(where["device"])
    kw = {}
    if lengths is not None:
        kw["padding"] = Padding.of(lengths, x.shape[1])
    if context is not None:
        kw["context"] = context.to(**where)
        context_lengths = None if context_lengths is None else context_lengths.to(where["device"])
        kw["context_padding"] = None if context_lengths is None else Padding.of(context_lengths, context.shape[1])
    out = module(x, **kw)
    positions = torch.arange(x.shape[1], device=x.device)
    real = 1.0 if lengths is None else (positions[None, :] < lengths[:, None])[..., None]
    loss = (out * real * torch.linspace(-1, 1, out.shape[-1], **where)).square().sum()
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return out * real, dict(zip(["x", *(n for n, p in module.named_parameters() if p.requires_grad)], grads))


def check_backends(backends, causal, window, padded, position, kv_heads, cross=None, device="cpu",
                   dtype=torch.float32, **options):  # fmt: skip
    """Each of `backends` within the criterion of the brute force, the modules on `device` in
    `dtype`. cross=(Tq, Tk): cross-attention of Tq queries over Tk context keys (with padded
    context when `padded`)."""
    kw = dict(num_kv_heads=kv_heads, position=position, window=window, qk_norm="layernorm", **options)
    torch.manual_seed(0)
    modules = [Attention(32, 4, AttentionConfig(backend=b, **kw), causal=causal, kv_dim=cross and 24).to(device, dtype)
               for b in backends]  # fmt: skip
    with torch.no_grad():  # learnable bias offsets, temperatures and sinks start at 0: make them matter
        for p in (modules[0].bias_offset, modules[0].log_temperature, modules[0].sink_logit):
            if isinstance(p, torch.nn.Parameter):  # (the off-by-one softmax's sink is a fixed 0)
                p.normal_(std=0.3)
    for m in modules[1:]:
        m.load_state_dict(modules[0].state_dict())
    exact = use_brute_force(copy.deepcopy(modules[0]).cpu().double())  # the brute force's loops run on the CPU
    lowp = use_brute_force(copy.deepcopy(modules[0]).cpu())
    tq, tk = cross or (11, 11)
    x = torch.randn(3, tq, 32)
    lengths = torch.tensor([tq, tq // 2 + 1, 1]) if padded else None
    inputs = (x, lengths)
    if cross:
        inputs += (torch.randn(3, tk, 24), torch.tensor([tk, 3, 1]) if padded else None)
    ref, base = run(exact, *inputs), run(lowp, *inputs)
    for backend, module in zip(backends, modules):
        ours = run(module, *inputs)
        criterion(ours[0].cpu(), base[0], ref[0], f"{backend} out")
        for name in ref[1]:
            criterion(ours[1][name].cpu(), base[1][name], ref[1][name], f"{backend} grad {name}")
