"""INT8 for the split UNet: calibration capture through the runtime's recording hook (`capture`), and
post-training quantization with onnxruntime.quantization, validated against fp32 (`quantize`)."""
