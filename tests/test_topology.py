"""Device placement and per-round links: seeded heterogeneity, bandwidth sharing, per-round costs."""

import math

import pytest

from edgelam.config import NetConfig
from edgelam.net import channel
from edgelam.net.topology import client_round_cost, draw_links, place_devices
from edgelam.store import rng_for


def test_placement_is_seeded_and_in_range():
    cfg = NetConfig(device_cpu_hz=(1e9, 3e9), cell_radius_m=300.0)
    a = place_devices(cfg, 20, rng_for(0))
    assert a == place_devices(cfg, 20, rng_for(0))
    assert a != place_devices(cfg, 20, rng_for(1))
    for d in a.devices:
        assert 1e9 <= d.cpu_hz <= 3e9
        assert cfg.min_distance_m <= math.hypot(d.x_m, d.y_m) <= 300.0
    assert len({round(d.cpu_hz) for d in a.devices}) == 20  # heterogeneous


def test_bandwidth_is_shared_among_scheduled_devices():
    cfg = NetConfig(fading="none", shadowing_db=0.0)
    topo = place_devices(cfg, 4, rng_for(0))
    alone = draw_links(cfg, topo, [0], rng_for(5))[0]
    shared = draw_links(cfg, topo, [0, 1, 2, 3], rng_for(5))[0]
    # same gain, a quarter of the band: rate = B/4 log2(1 + 4 SNR) < B log2(1 + SNR)
    assert shared.gain == alone.gain
    snr = channel.snr_linear(topo.devices[0].tx_power_w, alone.gain, channel.noise_power_w(10e6, -174, 7))
    assert alone.up_bps == pytest.approx(channel.shannon_rate_bps(10e6, snr))
    assert shared.up_bps == pytest.approx(channel.shannon_rate_bps(2.5e6, 4 * snr))


def test_fading_redrawn_per_round():
    cfg = NetConfig()
    topo = place_devices(cfg, 3, rng_for(0))
    g1 = draw_links(cfg, topo, [0, 1, 2], rng_for(0, 2, 1))
    g2 = draw_links(cfg, topo, [0, 1, 2], rng_for(0, 2, 2))
    assert g1 != g2
    assert g1 == draw_links(cfg, topo, [0, 1, 2], rng_for(0, 2, 1))


def test_client_round_cost_by_hand():
    cfg = NetConfig()
    dev = place_devices(cfg, 1, rng_for(0)).devices[0]
    from edgelam.net.topology import LinkState

    link = LinkState(gain=1e-10, up_bps=8e6, down_bps=16e6)
    cost = client_round_cost(cfg, dev, link, bytes_down=2_000_000, bytes_up=1_000_000, flops=dev.flops_per_s * 3)
    assert cost.t_down_s == pytest.approx(1.0)  # 16 Mbit / 16 Mb/s
    assert cost.t_up_s == pytest.approx(1.0)
    assert cost.t_comp_s == pytest.approx(3.0)
    assert cost.e_tx_j == pytest.approx(dev.tx_power_w * 1.0)
    cloud = client_round_cost(NetConfig(server_tier="cloud", backhaul_bps=8e6, backhaul_latency_s=0.5), dev, link,
                              2_000_000, 1_000_000, 0.0)
    assert cloud.t_up_s == pytest.approx(1.0 + 0.5 + 1.0)


def test_devices_attach_by_config_or_distance():
    cfg = NetConfig(num_edge_servers=3, attach=(2, 0, 1, 2))
    topo = place_devices(cfg, 4, rng_for(0))
    assert [d.edge for d in topo.devices] == [2, 0, 1, 2]
    nearest = place_devices(NetConfig(num_edge_servers=3), 12, rng_for(0))
    for d in nearest.devices:
        dists = [math.hypot(d.x_m - x, d.y_m - y) for x, y in nearest.edges]
        assert d.edge == dists.index(min(dists))
    from edgelam.config import ConfigError

    with pytest.raises(ConfigError, match="net.attach lists 4 edge servers for 5 devices"):
        place_devices(cfg, 5, rng_for(0))
    with pytest.raises(ConfigError, match=r"net.attach must list edge server indices in \[0, 3\)"):
        NetConfig(num_edge_servers=3, attach=(3,))
