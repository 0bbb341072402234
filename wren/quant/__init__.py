"""Quantizers for vectors and caches (see `wren.quant.turboquant`)."""
