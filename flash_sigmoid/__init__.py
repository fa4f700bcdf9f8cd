"""FlashSigmoid: fused sigmoid attention with FlashAttention-2's API."""
