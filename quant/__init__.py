"""DiTAS post-training quantization: quantizers, smoothing, LoRA fit, alpha search, QuantLinear."""
