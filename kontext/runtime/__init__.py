"""The model runtime: loading FLUX.1 Kontext, packing and encoding, LoRA (attach and file I/O), quantization, sampling."""
