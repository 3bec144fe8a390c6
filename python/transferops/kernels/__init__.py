"""Triton kernels of transferops, one module per hot path. Importing this package needs triton;
set TRITON_INTERPRET=1 before importing it to run the kernels on CPU tensors (tests)."""
