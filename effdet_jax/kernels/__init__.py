"""Hand-written XLA:CPU kernels, called through the XLA FFI and compiled on first use."""
