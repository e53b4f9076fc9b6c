"""The quantized layers: QuantLinear (fake-quant) and IntLinear (integer), and the backend switch."""
