"""Model FLOPs utilisation: achieved FLOP/s over the device's dense bf16 peak (the one MFU formula)."""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "H800": 989.4,
    "H20": 148.0,
    "GH200": 989.4,
    "B200": 2250.0,
    "GB200": 2500.0,
    "B300": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 6000 Ada": 364.2,
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), None if unknown."""
    name = device_name.upper()
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_BF16_TFLOPS["H100 PCIe"]
        if "NVL" in name:
            return PEAK_BF16_TFLOPS["H100 NVL"]
        return PEAK_BF16_TFLOPS["H100 SXM"]
    # Longest key first so 'GH200' wins over 'H200' and 'GB200' over 'B200'.
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.upper() in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Fraction of peak (0..1) for one device, or None when the peak is unknown."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)
