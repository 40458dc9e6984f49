"""Radio formulas against values worked out by hand."""

import math

import pytest

from edgelam.net import channel


def test_macro_path_loss_at_500m():
    # 128.1 + 37.6 * log10(0.5) = 128.1 - 11.318 = 116.782
    assert channel.path_loss_macro_db(500.0) == pytest.approx(116.782, abs=1e-3)
    assert channel.path_loss_macro_db(1000.0) == pytest.approx(128.1)


def test_rate_example_from_the_literature():
    # p = 0.2 W, PL = 116.78 dB, N0 = -174 dBm/Hz, B = 1 MHz, no noise figure:
    # noise = 10^(-20.4) * 1e6 = 3.981e-15 W; gain = 10^(-11.678) = 2.099e-12
    # SNR = 0.2 * 2.099e-12 / 3.981e-15 = 105.4 (20.2 dB); r = 1e6 log2(106.4) = 6.73 Mb/s
    gain = channel.db_to_linear(-channel.path_loss_macro_db(500.0))
    noise = channel.noise_power_w(1e6, -174.0, 0.0)
    assert noise == pytest.approx(3.981e-15, rel=1e-3)
    snr = channel.snr_linear(0.2, gain, noise)
    assert 10 * math.log10(snr) == pytest.approx(20.23, abs=0.01)
    assert channel.shannon_rate_bps(1e6, snr) == pytest.approx(6.73e6, rel=2e-3)


def test_noise_figure_raises_noise():
    assert channel.noise_power_w(1e6, -174.0, 10.0) == pytest.approx(10 * channel.noise_power_w(1e6, -174.0, 0.0))


def test_uma_los_below_breakpoint():
    # d2D = 100 m, fc = 3.5 GHz, hBS = 25, hUT = 1.5: d3D = sqrt(100^2 + 23.5^2) = 102.724
    # d'BP = 4 * 24 * 0.5 * 3.5e9 / c = 560.4 m > 100 m, so PL1 = 28 + 22 log10(102.724) + 20 log10(3.5)
    #      = 28 + 44.258 + 10.881 = 83.139
    assert channel.path_loss_uma_los_db(100.0, 3.5, 25.0, 1.5) == pytest.approx(83.139, abs=1e-2)


def test_uma_los_above_breakpoint_and_nlos():
    # d2D = 1000 m: PL2 = 28 + 40 log10(1000.276) + 20 log10(3.5) - 9 log10(560.39^2 + 23.5^2)
    #     = 28 + 120.0048 + 10.8814 - 9 * 5.49774 (= 49.4797) = 109.4065
    assert channel.path_loss_uma_los_db(1000.0, 3.5) == pytest.approx(109.4065, abs=1e-3)
    # NLOS: 13.54 + 39.08 log10(1000.276) + 20 log10(3.5) = 13.54 + 117.2447 + 10.8814 = 141.666
    assert channel.path_loss_uma_nlos_db(1000.0, 3.5) == pytest.approx(141.666, abs=1e-2)


def test_umi_nlos_never_below_los():
    for d in (20.0, 80.0, 300.0, 900.0):
        assert channel.path_loss_umi_nlos_db(d, 3.5) >= channel.path_loss_umi_los_db(d, 3.5)


def test_los_probability():
    assert channel.los_probability_uma(10.0) == 1.0
    # 18/100 + exp(-100/63) * (1 - 18/100) = 0.18 + 0.20453 * 0.82 = 0.34772
    assert channel.los_probability_uma(100.0) == pytest.approx(0.34772, abs=1e-4)
    assert channel.los_probability_umi(100.0) < channel.los_probability_uma(100.0)


def test_time_and_energy():
    assert channel.transfer_time_s(1_000_000, 8e6) == pytest.approx(1.0)
    assert channel.tx_energy_j(0.2, 2.5) == pytest.approx(0.5)
    # 1.6e10 FLOPs at 1 GHz x 16 FLOPs/cycle: 1e9 cycles -> 1 s; energy 1e-28 * 1e9 * (1e9)^2 = 0.1 J
    assert channel.compute_time_s(1.6e10, 1e9, 16.0) == pytest.approx(1.0)
    assert channel.compute_energy_j(1.6e10, 1e9, 16.0, 1e-28) == pytest.approx(0.1)
    assert channel.dbm_to_w(23.0) == pytest.approx(0.19953, rel=1e-4)


def test_umi_los_below_breakpoint():
    # d2D = 50 m, fc = 3.5 GHz, hBS = 10, hUT = 1.5: d3D = sqrt(50^2 + 8.5^2) = 50.7174; d'BP = 210.1 m
    # PL1 = 32.4 + 21 log10(50.7174) + 20 log10(3.5) = 32.4 + 35.8086 + 10.8814 = 79.090
    assert channel.path_loss_umi_los_db(50.0, 3.5, 10.0, 1.5) == pytest.approx(79.090, abs=1e-2)
