"""The hybrid MoE engine: models, quantized expert backends, sampler."""
