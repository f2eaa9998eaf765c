"""Dead-leaves images (training/synthetic.py) and their use as a general-student pool source."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.core.errors import ConfigError
from vpr_ros.training.synthetic import dead_leaves, dead_leaves_records, leaf_radii


def test_leaf_radii_follow_the_r_cubed_law():
    # p(r) = c r^-3 on [2, 8]: CDF F(x) = (2^-2 - x^-2) / (2^-2 - 8^-2); by hand, F(x) = 1/2 at
    # x^-2 = 1/4 - (1/2)(15/64) = 8.5/64, x = 2.7440; F(x) = 0.9 at x^-2 = 1/4 - 0.9 (15/64) = 2.5/64,
    # x = 5.0596
    r = leaf_radii(np.random.default_rng(0), 200_000, 2.0, 8.0)
    assert r.min() >= 2.0 and r.max() <= 8.0
    assert np.quantile(r, 0.5) == pytest.approx(2.7440, abs=0.01)
    assert np.quantile(r, 0.9) == pytest.approx(5.0596, abs=0.03)
    with pytest.raises(ValueError, match="r_min < r_max"):
        leaf_radii(np.random.default_rng(0), 3, 8.0, 2.0)


def test_dead_leaves_are_a_pure_function_of_seed_and_index():
    a = dead_leaves(3, 7, (60, 80))
    assert a.shape == (60, 80, 3) and a.dtype == np.uint8
    assert np.array_equal(a, dead_leaves(3, 7, (60, 80)))
    assert not np.array_equal(a, dead_leaves(3, 8, (60, 80)))
    assert not np.array_equal(a, dead_leaves(4, 7, (60, 80)))


def test_dead_leaves_spectrum_falls_as_a_power_of_frequency_like_natural_images():
    # natural images: power ~ 1/f^a with a near 2; white noise: a = 0. Fit a over 4..60 cycles per image
    # on the mean spectrum of a few 256x256 images.
    power = np.zeros((256, 256))
    for i in range(4):
        g = dead_leaves(0, i, (256, 256)).astype(np.float64).mean(axis=2)
        power += np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
    yy, xx = np.indices(power.shape) - 128
    f = np.hypot(yy, xx).astype(int)
    band = np.arange(4, 61)
    radial = np.array([power[f == k].mean() for k in band])
    slope = np.polyfit(np.log(band), np.log(radial), 1)[0]
    assert -3.0 < slope < -1.5, slope
    # and most of the canvas is covered by leaves, not the background colour
    img = dead_leaves(0, 0, (120, 160))
    background = np.all(img == img[0, 0], axis=2).mean()
    assert background < 0.2


def test_a_dead_leaves_source_joins_the_pool_and_is_named_on_the_card():
    from vpr_ros.training.methods.general import (
        GeneralConfig,
        PoolConfig,
        SourceConfig,
        pool_card,
        source_records,
        validate_general,
    )

    src = SourceConfig(kind="dead_leaves", count=5, size=[48, 64], seed=2)
    recs = source_records(src)
    assert [r.name for r in recs] == [f"dead_leaves/2/48x64/{i:06d}" for i in range(5)]
    assert np.array_equal(recs[3].load(), dead_leaves(2, 3, (48, 64)))
    assert recs == dead_leaves_records(5, seed=2, size=(48, 64))
    cfg = GeneralConfig(data=PoolConfig(sources=[src]))
    validate_general(cfg)  # no root needed
    card = pool_card(cfg, 5)
    assert "5 dead-leaves images 48x64 (synthetic, seed 2)" in card["train_data"]
    assert card["train_domains"] == ["dead_leaves"]
    for bad, key in ((SourceConfig(kind="dead_leaves", count=0), "count"),
                     (SourceConfig(kind="dead_leaves", size=[8, 64]), "size")):
        with pytest.raises(ConfigError, match=key):
            validate_general(GeneralConfig(data=PoolConfig(sources=[bad])))
    with pytest.raises(ConfigError, match="root"):
        validate_general(GeneralConfig(data=PoolConfig(sources=[SourceConfig(kind="images")])))
