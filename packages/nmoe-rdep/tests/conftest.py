"""RDEP's CPU tests run the GPU path's Triton kernels through Triton's interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
