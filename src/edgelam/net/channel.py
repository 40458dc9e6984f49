"""Radio-link formulas as pure functions. Distances in metres, frequencies in GHz unless named _hz.

Sources: 3GPP TR 38.901 v17 Table 7.4.1-1 (UMa/UMi path loss) and Table 7.4.2-1 (LOS
probability); the macro model 128.1 + 37.6 log10(d_km) from 3GPP TR 36.814 as used by
Yang et al., IEEE TWC 2021 (arXiv 1911.02417); Shannon capacity for the rate.
"""

from __future__ import annotations

import math

SPEED_OF_LIGHT_M_S = 299_792_458.0


def db_to_linear(x_db: float) -> float:
    return 10.0 ** (x_db / 10.0)


def dbm_to_w(x_dbm: float) -> float:
    return 10.0 ** ((x_dbm - 30.0) / 10.0)


def path_loss_macro_db(d_m: float) -> float:
    """128.1 + 37.6 log10(d[km]) (TR 36.814 macro cell, 2 GHz)."""
    return 128.1 + 37.6 * math.log10(d_m / 1000.0)


def _breakpoint_m(h_bs_m: float, h_ut_m: float, fc_ghz: float) -> float:
    # d'_BP = 4 h'_BS h'_UT f_c / c with effective heights h' = h - 1 m (TR 38.901 Note 1).
    return 4.0 * (h_bs_m - 1.0) * (h_ut_m - 1.0) * fc_ghz * 1e9 / SPEED_OF_LIGHT_M_S


def _two_slope_los_db(d2d_m: float, fc_ghz: float, h_bs_m: float, h_ut_m: float,
                      intercept_db: float, slope_near: float, bp_coeff: float) -> float:
    """TR 38.901 LOS shape shared by UMa and UMi: PL1 below the breakpoint d'_BP, PL2 above."""
    d3d = math.hypot(d2d_m, h_bs_m - h_ut_m)
    d_bp = _breakpoint_m(h_bs_m, h_ut_m, fc_ghz)
    if d2d_m <= d_bp:
        return intercept_db + slope_near * math.log10(d3d) + 20.0 * math.log10(fc_ghz)
    return (intercept_db + 40.0 * math.log10(d3d) + 20.0 * math.log10(fc_ghz)
            - bp_coeff * math.log10(d_bp**2 + (h_bs_m - h_ut_m) ** 2))


def path_loss_uma_los_db(d2d_m: float, fc_ghz: float, h_bs_m: float = 25.0, h_ut_m: float = 1.5) -> float:
    """TR 38.901 UMa LOS: PL1 = 28 + 22 log10 d3D + 20 log10 fc; PL2 = 28 + 40 log10 d3D + 20 log10 fc
    - 9 log10(d'_BP^2 + (h_BS - h_UT)^2)."""
    return _two_slope_los_db(d2d_m, fc_ghz, h_bs_m, h_ut_m, 28.0, 22.0, 9.0)


def path_loss_uma_nlos_db(d2d_m: float, fc_ghz: float, h_bs_m: float = 25.0, h_ut_m: float = 1.5) -> float:
    """TR 38.901 UMa NLOS: max(PL_LOS, 13.54 + 39.08 log10 d3D + 20 log10 fc - 0.6 (h_UT - 1.5))."""
    d3d = math.hypot(d2d_m, h_bs_m - h_ut_m)
    nlos = 13.54 + 39.08 * math.log10(d3d) + 20.0 * math.log10(fc_ghz) - 0.6 * (h_ut_m - 1.5)
    return max(path_loss_uma_los_db(d2d_m, fc_ghz, h_bs_m, h_ut_m), nlos)


def path_loss_umi_los_db(d2d_m: float, fc_ghz: float, h_bs_m: float = 10.0, h_ut_m: float = 1.5) -> float:
    """TR 38.901 UMi street canyon LOS: PL1 = 32.4 + 21 log10 d3D + 20 log10 fc; PL2 = 32.4 + 40 log10 d3D
    + 20 log10 fc - 9.5 log10(d'_BP^2 + (h_BS - h_UT)^2)."""
    return _two_slope_los_db(d2d_m, fc_ghz, h_bs_m, h_ut_m, 32.4, 21.0, 9.5)


def path_loss_umi_nlos_db(d2d_m: float, fc_ghz: float, h_bs_m: float = 10.0, h_ut_m: float = 1.5) -> float:
    """TR 38.901 UMi NLOS: max(PL_LOS, 22.4 + 35.3 log10 d3D + 21.3 log10 fc - 0.3 (h_UT - 1.5))."""
    d3d = math.hypot(d2d_m, h_bs_m - h_ut_m)
    nlos = 22.4 + 35.3 * math.log10(d3d) + 21.3 * math.log10(fc_ghz) - 0.3 * (h_ut_m - 1.5)
    return max(path_loss_umi_los_db(d2d_m, fc_ghz, h_bs_m, h_ut_m), nlos)


def los_probability_uma(d2d_m: float) -> float:
    """TR 38.901 Table 7.4.2-1, UMa with h_UT <= 13 m."""
    if d2d_m <= 18.0:
        return 1.0
    return 18.0 / d2d_m + math.exp(-d2d_m / 63.0) * (1.0 - 18.0 / d2d_m)


def los_probability_umi(d2d_m: float) -> float:
    """TR 38.901 Table 7.4.2-1, UMi street canyon."""
    if d2d_m <= 18.0:
        return 1.0
    return 18.0 / d2d_m + math.exp(-d2d_m / 36.0) * (1.0 - 18.0 / d2d_m)


# TR 38.901 Table 7.4.1-1 shadow-fading standard deviations (dB).
SHADOWING_DB = {("uma", True): 4.0, ("uma", False): 6.0, ("umi", True): 4.0, ("umi", False): 7.82}


def noise_power_w(bandwidth_hz: float, noise_psd_dbm_hz: float = -174.0, noise_figure_db: float = 0.0) -> float:
    """Thermal noise N0 * B, raised by the receiver noise figure."""
    return dbm_to_w(noise_psd_dbm_hz + noise_figure_db) * bandwidth_hz


def snr_linear(tx_power_w: float, gain_linear: float, noise_w: float) -> float:
    return tx_power_w * gain_linear / noise_w


def shannon_rate_bps(bandwidth_hz: float, snr: float) -> float:
    """r = B log2(1 + SNR)."""
    return bandwidth_hz * math.log2(1.0 + snr)


def transfer_time_s(n_bytes: int, rate_bps: float) -> float:
    """t = 8 S / r."""
    return 8.0 * n_bytes / rate_bps


def tx_energy_j(tx_power_w: float, time_s: float) -> float:
    """E = p t."""
    return tx_power_w * time_s


def compute_time_s(flops: float, cpu_hz: float, flops_per_cycle: float) -> float:
    """t = FLOPs / (f * nu)."""
    return flops / (cpu_hz * flops_per_cycle)


def compute_energy_j(flops: float, cpu_hz: float, flops_per_cycle: float, kappa: float) -> float:
    """E = kappa * cycles * f^2 with cycles = FLOPs / nu (dynamic CMOS power; Mao et al. 2017)."""
    return kappa * (flops / flops_per_cycle) * cpu_hz**2
