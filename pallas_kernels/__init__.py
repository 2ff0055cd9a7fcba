"""Pallas kernels for jaxserve. Never imports jaxserve: each kernel stands alone with its reference."""
