"""nmoe.kernels"""
