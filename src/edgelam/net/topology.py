"""Devices in tiers (end, edge, cloud), their placement and per-round link states.

End devices are dropped uniformly in a disc of radius ``cell_radius_m`` around an edge server
(the base station) and attach to the nearest one, or to the one ``net.attach`` names. Large-scale gain (path loss, shadowing, LOS
state) is drawn once at placement; Rayleigh block fading |h|^2 ~ Exp(1) is redrawn every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelam.config import ConfigError, NetConfig
from edgelam.net import channel


@dataclass(frozen=True)
class Device:
    id: int
    tier: str  # end | edge | cloud
    x_m: float
    y_m: float
    cpu_hz: float
    flops_per_cycle: float
    memory_gb: float
    tx_power_w: float
    kappa: float
    edge: int  # serving edge server (end devices)
    large_scale_gain: float  # linear, path loss and shadowing (end devices)

    @property
    def flops_per_s(self) -> float:
        return self.cpu_hz * self.flops_per_cycle


@dataclass(frozen=True)
class Topology:
    devices: list[Device]  # end devices, one per client
    edges: list[tuple[float, float]]  # edge server positions (m)


@dataclass(frozen=True)
class LinkState:
    gain: float  # linear channel gain this round (large scale x fading)
    up_bps: float
    down_bps: float


def edge_positions(num_edges: int, cell_radius_m: float) -> list[tuple[float, float]]:
    if num_edges == 1:
        return [(0.0, 0.0)]
    return [(cell_radius_m * math.cos(2 * math.pi * j / num_edges), cell_radius_m * math.sin(2 * math.pi * j / num_edges))
            for j in range(num_edges)]


def large_scale_gain(cfg: NetConfig, d2d_m: float, rng: np.random.Generator) -> float:
    """Path loss and log-normal shadowing as a linear gain (<1)."""
    if cfg.path_loss == "macro":
        pl_db = channel.path_loss_macro_db(max(d2d_m, 1.0))
        sigma = cfg.shadowing_db
    else:
        p_los = (channel.los_probability_uma if cfg.path_loss == "uma" else channel.los_probability_umi)(d2d_m)
        los = bool(rng.random() < p_los)
        fn = {("uma", True): channel.path_loss_uma_los_db, ("uma", False): channel.path_loss_uma_nlos_db,
              ("umi", True): channel.path_loss_umi_los_db, ("umi", False): channel.path_loss_umi_nlos_db}
        pl_db = fn[(cfg.path_loss, los)](d2d_m, cfg.carrier_ghz or 3.5, cfg.bs_height_m, cfg.ut_height_m)
        sigma = channel.SHADOWING_DB[(cfg.path_loss, los)]
    shadow_db = float(rng.normal(0.0, sigma)) if sigma > 0 else 0.0
    return channel.db_to_linear(-(pl_db + shadow_db))


def place_devices(cfg: NetConfig, num_devices: int, rng: np.random.Generator) -> Topology:
    """Heterogeneous end devices: position, CPU clock, memory and power drawn from ``cfg``'s ranges."""
    edges = edge_positions(cfg.num_edge_servers, cfg.cell_radius_m)
    if cfg.attach and len(cfg.attach) != num_devices:
        raise ConfigError(f"net.attach lists {len(cfg.attach)} edge servers for {num_devices} devices; give one per device")
    devices = []
    for k in range(num_devices):
        home = edges[cfg.attach[k]] if cfg.attach else edges[int(rng.integers(len(edges)))]
        # uniform in the annulus [min_distance, radius]: r = sqrt(U(r0^2, R^2))
        r = math.sqrt(rng.uniform(cfg.min_distance_m**2, cfg.cell_radius_m**2))
        theta = rng.uniform(0, 2 * math.pi)
        x, y = home[0] + r * math.cos(theta), home[1] + r * math.sin(theta)
        dists = [math.hypot(x - ex, y - ey) for ex, ey in edges]
        edge = cfg.attach[k] if cfg.attach else int(np.argmin(dists))
        devices.append(Device(
            id=k, tier="end", x_m=x, y_m=y,
            cpu_hz=float(rng.uniform(*cfg.device_cpu_hz)),
            flops_per_cycle=cfg.device_flops_per_cycle,
            memory_gb=float(rng.uniform(*cfg.device_memory_gb)),
            tx_power_w=channel.dbm_to_w(float(rng.uniform(*cfg.device_tx_power_dbm))),
            kappa=cfg.kappa, edge=edge,
            large_scale_gain=large_scale_gain(cfg, max(dists[edge], cfg.min_distance_m), rng),
        ))
    return Topology(devices=devices, edges=edges)


def link_state(cfg: NetConfig, dev: Device, gain: float, share: int) -> LinkState:
    """Shannon rates up and down with channel ``gain`` and 1/``share`` of the edge's bands (FDMA)."""
    b_up, b_down = cfg.uplink_bandwidth_hz / share, cfg.downlink_bandwidth_hz / share
    snr_up = channel.snr_linear(dev.tx_power_w, gain, channel.noise_power_w(b_up, cfg.noise_psd_dbm_hz, cfg.noise_figure_db))
    snr_down = channel.snr_linear(channel.dbm_to_w(cfg.server_tx_power_dbm), gain,
                                  channel.noise_power_w(b_down, cfg.noise_psd_dbm_hz, cfg.noise_figure_db))
    return LinkState(gain, channel.shannon_rate_bps(b_up, snr_up), channel.shannon_rate_bps(b_down, snr_down))


def draw_links(cfg: NetConfig, topo: Topology, scheduled: list[int], rng: np.random.Generator) -> dict[int, LinkState]:
    """This round's links for the scheduled devices; each edge splits its bandwidth equally among them."""
    per_edge: dict[int, int] = {}
    for k in scheduled:
        per_edge[topo.devices[k].edge] = per_edge.get(topo.devices[k].edge, 0) + 1
    out = {}
    for k in scheduled:
        dev = topo.devices[k]
        fading = float(rng.exponential(1.0)) if cfg.fading == "rayleigh" else 1.0
        out[k] = link_state(cfg, dev, dev.large_scale_gain * fading, per_edge[dev.edge])
    return out


def expected_link(cfg: NetConfig, dev: Device, num_scheduled: int) -> LinkState:
    """The link without fading (|h|^2 = 1), the edge's band shared by ``num_scheduled`` devices."""
    return link_state(cfg, dev, dev.large_scale_gain, num_scheduled)


@dataclass(frozen=True)
class ClientCost:
    t_down_s: float
    t_comp_s: float
    t_up_s: float
    e_tx_j: float
    e_comp_j: float
    bytes_down: int
    bytes_up: int
    flops: float

    @property
    def total_s(self) -> float:
        return self.t_down_s + self.t_comp_s + self.t_up_s


def client_round_cost(cfg: NetConfig, dev: Device, link: LinkState, bytes_down: int, bytes_up: int, flops: float) -> ClientCost:
    """Download the global adapter, train locally, upload the update; the cloud adds the backhaul."""
    t_down = channel.transfer_time_s(bytes_down, link.down_bps)
    t_up = channel.transfer_time_s(bytes_up, link.up_bps)
    if cfg.server_tier == "cloud":
        t_down += cfg.backhaul_latency_s + channel.transfer_time_s(bytes_down, cfg.backhaul_bps)
        t_up += cfg.backhaul_latency_s + channel.transfer_time_s(bytes_up, cfg.backhaul_bps)
    t_comp = channel.compute_time_s(flops, dev.cpu_hz, dev.flops_per_cycle)
    return ClientCost(
        t_down_s=t_down, t_comp_s=t_comp, t_up_s=t_up,
        e_tx_j=channel.tx_energy_j(dev.tx_power_w, channel.transfer_time_s(bytes_up, link.up_bps)),
        e_comp_j=channel.compute_energy_j(flops, dev.cpu_hz, dev.flops_per_cycle, dev.kappa),
        bytes_down=bytes_down, bytes_up=bytes_up, flops=flops,
    )
