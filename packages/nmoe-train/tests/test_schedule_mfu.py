"""LR schedules and the MFU peak table."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.train.config import OptimConfig
from nmoe.train.mfu import mfu, peak_tflops
from nmoe.train.schedule import lr_at


def test_wsd_shape():
    cfg = OptimConfig(lr=1.0, warmup=10, warmdown=20, schedule="wsd")
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(1 / 20)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_cosine_reaches_the_floor():
    cfg = OptimConfig(lr=2.0, warmup=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(2.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.2)
    assert lr_at(50, 100, cfg) == pytest.approx(1.1)


@settings(max_examples=50, deadline=None)
@given(
    steps=st.integers(1, 5000),
    warm=st.integers(0, 100),
    down=st.integers(0, 100),
    schedule=st.sampled_from(["wsd", "cosine"]),
    floor=st.floats(0, 1),
)
def test_lr_stays_within_bounds(steps, warm, down, schedule, floor):
    cfg = OptimConfig(
        lr=3e-3,
        warmup=min(warm, steps),
        warmdown=min(down, steps - min(warm, steps)),
        schedule=schedule,
        min_lr_ratio=floor,
    )
    for s in range(0, steps, max(1, steps // 50)):
        lr = lr_at(s, steps, cfg)
        assert 3e-3 * floor * (1 - 1e-12) <= lr <= 3e-3 * (1 + 1e-12) or (s < cfg.warmup and 0 < lr)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA GH200 480GB") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA B200") == pytest.approx(2250.0)
    assert peak_tflops("NVIDIA GB200") == pytest.approx(2500.0)
    assert peak_tflops("Some Future GPU") is None
    assert mfu(2e9, 1e5, 1000.0) == pytest.approx(0.2)
    assert mfu(2e9, 1e5, None) is None
