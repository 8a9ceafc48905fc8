"""Quantization core: number formats (formats.py), observers (observers.py), round-to-nearest (rtn.py), the
QuantLinear module (qlinear.py), the checkpoint (checkpoint.py), and the calibrate / quantize stages.

Kept import-light: importing a submodule pulls in only what it needs (qlinear loads the kernels)."""
