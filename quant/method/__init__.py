"""The paper's method on tensors: quantizers, TAS smoothing, the LoRA fit, folding, the layer registry."""
