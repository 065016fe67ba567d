"""Device and link profiles of an edge network, their presets, and the time model that turns them into seconds: the
one formula the simulator's virtual clock and the network's shaping both use, so they cannot disagree.

Time model (every number deterministic under the run's seed; no reading of this machine's clock):
- compute: ``samples x epochs x cost`` where cost is the model's training FLOPs per sample (counted, not timed;
  ``fl.cost``) over the device's effective GFLOP/s, or the device's own ``sample_ms`` when a trace gives one.
- transfer of B bytes in S = ceil(B/1460) segments: ``rtt/2 + jitter + 8(B + 40S) / (rate x (1 - loss)) +
  S x loss x rtt``: one-way latency, a half-normal jitter draw, the payload with its IP and TCP headers at the
  link's rate less what is lost and sent again, and one round trip of stall per lost segment (fast retransmit).
  Downloads use ``down_mbps``, uploads ``up_mbps``.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config import ConfigError

MSS_BYTES = 1460      # a TCP segment's payload on Ethernet-sized paths
HEADER_BYTES = 40     # its IP and TCP headers, which the link's rate carries too


@dataclass(frozen=True)
class DeviceProfile:
    """How fast an edge node trains: effective training throughput (GFLOP/s), or a fixed cost per sample."""

    name: str
    gflops: float | None = None       # effective FP32 training GFLOP/s (forward + backward, small batches)
    sample_ms: float | None = None    # or: milliseconds per training sample of the run's model (traces)
    relative: float | None = None     # or: this share of the host's measured rate ({ speed = 0.25 })

    def seconds_per_sample(self, flops_per_sample: float, host_gflops: float | None) -> float:
        if self.sample_ms is not None:
            return self.sample_ms / 1000.0
        if self.relative is not None:
            if host_gflops is None:
                raise ConfigError(f"device {self.name!r} is relative to this machine, but its rate was not measured "
                                  "or given ([compute] host_gflops)")
            return flops_per_sample / (self.relative * host_gflops * 1e9)
        assert self.gflops is not None
        return flops_per_sample / (self.gflops * 1e9)


@dataclass(frozen=True)
class LinkProfile:
    """A network path: round-trip time, rates each way, jitter (standard deviation of the one-way delay) and the
    share of segments lost."""

    name: str
    rtt_ms: float
    up_mbps: float
    down_mbps: float
    jitter_ms: float = 0.0
    loss: float = 0.0

    def transfer_s(self, nbytes: int, up: bool, draw: float = 0.0) -> float:
        """Seconds to move ``nbytes`` one way (``up``: towards the super node / the proposer); ``draw`` is a
        standard normal variate for the jitter (``jitter_draw``), 0 for none."""
        rate = (self.up_mbps if up else self.down_mbps) * 1e6 * (1.0 - self.loss)
        rtt = self.rtt_ms / 1000.0
        segments = math.ceil(nbytes / MSS_BYTES)
        wire = nbytes + segments * HEADER_BYTES
        return rtt / 2 + abs(draw) * self.jitter_ms / 1000.0 + 8.0 * wire / rate + segments * self.loss * rtt


# Presets. Effective GFLOP/s is the sustained rate of small-batch FP32 training in PyTorch, a share of the chip's
# peak: order-of-magnitude estimates, 5-10% of peak on Arm CPUs, 30% of AVX2 peak on an x86 laptop (one core of this
# project's 2-core AMD EPYC test machine reaches about half for the MNIST CNN: BENCHMARKS.md "Device presets"). Pin
# measured numbers with { gflops = G } or a device trace.
DEVICES: dict[str, DeviceProfile] = {
    # Raspberry Pi 4 B: 4x Cortex-A72 at 1.5 GHz, two 128-bit NEON FMA pipes: 96 GFLOP/s peak; 5%
    "rpi4": DeviceProfile("rpi4", gflops=4.8),
    # Raspberry Pi 3 B+: 4x Cortex-A53 at 1.4 GHz, 4 FLOP/cycle: 22 GFLOP/s peak; 8%
    "rpi3": DeviceProfile("rpi3", gflops=1.8),
    # Jetson Nano: 128-core Maxwell GPU, 236 GFLOP/s FP32 peak (NVIDIA data sheet); small batches keep it idle: 5%
    "jetson-nano": DeviceProfile("jetson-nano", gflops=12.0),
    # A mid-range phone: 2 big + 6 little Arm cores (Snapdragon 7-series class), about 100 GFLOP/s peak; 8%
    "phone": DeviceProfile("phone", gflops=8.0),
    # A 4-core x86 laptop with AVX2 FMA at about 3 GHz: 384 GFLOP/s peak; 30%
    "laptop": DeviceProfile("laptop", gflops=115.0),
}

LINKS: dict[str, LinkProfile] = {
    # Gigabit Ethernet in one room (IEEE 802.3ab); sub-millisecond RTT
    "lan": LinkProfile("lan", rtt_ms=0.5, up_mbps=940.0, down_mbps=940.0, jitter_ms=0.05, loss=0.0),
    # Home Wi-Fi 5 (802.11ac): Ookla Speedtest's fixed-broadband medians seen over Wi-Fi, about 100 down / 40 up
    "wifi": LinkProfile("wifi", rtt_ms=15.0, up_mbps=40.0, down_mbps=100.0, jitter_ms=4.0, loss=0.001),
    # LTE: Opensignal's 4G averages, about 30 down / 8 up Mbit/s, 50 ms latency
    "4g": LinkProfile("4g", rtt_ms=50.0, up_mbps=8.0, down_mbps=30.0, jitter_ms=10.0, loss=0.002),
    # UMTS/HSPA: about 3 down / 1 up Mbit/s, 150 ms (Opensignal's 3G figures)
    "3g": LinkProfile("3g", rtt_ms=150.0, up_mbps=1.0, down_mbps=3.0, jitter_ms=30.0, loss=0.01),
    # Geostationary satellite broadband: about 600 ms RTT (FCC Measuring Broadband America), 25 down / 3 up
    "satellite": LinkProfile("satellite", rtt_ms=600.0, up_mbps=3.0, down_mbps=25.0, jitter_ms=40.0, loss=0.005),
}

DEVICE_KEYS = {"speed", "gflops", "sample_ms"}
LINK_KEYS = {"rtt_ms", "up_mbps", "down_mbps", "jitter_ms", "loss"}


def number(where: str, key: str, value: Any, low: float, strict: bool = True, high: float | None = None) -> float:
    """A setting's number, checked against its bounds (``strict``: above ``low``); ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (number <= low if strict else number < low) or (high is not None
                                                                                     and number >= high):
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise ConfigError(f"{where}: {key} must be a number {bound}, got {value!r}")
    return number


def parse_device(value: Any, where: str) -> DeviceProfile:
    """A preset name, ``{ speed = S }`` (relative to this machine), ``{ gflops = G }`` or ``{ sample_ms = M }``."""
    if isinstance(value, str):
        if value not in DEVICES:
            raise ConfigError(f"{where}: unknown device {value!r}; presets: {', '.join(DEVICES)}, or "
                              "{ speed = 0.25 } relative to this machine")
        return DEVICES[value]
    if not isinstance(value, Mapping) or len(value) != 1 or not set(value) <= DEVICE_KEYS:
        raise ConfigError(f"{where}: a device is a preset name or a table with one of {', '.join(sorted(DEVICE_KEYS))}"
                          f", got {value!r}")
    (key, raw), = value.items()
    rate = number(where, key, raw, 0.0)
    if key == "speed":
        return DeviceProfile(f"speed={rate:g}", relative=rate)
    if key == "gflops":
        return DeviceProfile(f"gflops={rate:g}", gflops=rate)
    return DeviceProfile(f"sample_ms={rate:g}", sample_ms=rate)


def parse_link(value: Any, where: str) -> LinkProfile:
    """A preset name or ``{ rtt_ms, up_mbps, down_mbps[, jitter_ms, loss] }``."""
    if isinstance(value, str):
        if value not in LINKS:
            raise ConfigError(f"{where}: unknown link {value!r}; presets: {', '.join(LINKS)}, or "
                              "{ rtt_ms = 20, up_mbps = 10, down_mbps = 50, jitter_ms = 5, loss = 0.01 }")
        return LINKS[value]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: a link is a preset name or a table, got {value!r}")
    unknown = sorted(set(value) - LINK_KEYS)
    missing = sorted({"rtt_ms", "up_mbps", "down_mbps"} - set(value))
    if unknown or missing:
        raise ConfigError(f"{where}: link table " + (f"has unknown key {unknown[0]!r}" if unknown else
                                                     f"needs {', '.join(missing)}"))
    rtt = number(where, "rtt_ms", value["rtt_ms"], 0.0, strict=False)
    up = number(where, "up_mbps", value["up_mbps"], 0.0)
    down = number(where, "down_mbps", value["down_mbps"], 0.0)
    jitter = number(where, "jitter_ms", value.get("jitter_ms", 0.0), 0.0, strict=False)
    loss = number(where, "loss", value.get("loss", 0.0), 0.0, strict=False, high=1.0)
    return LinkProfile(f"rtt={rtt:g}ms,{down:g}/{up:g}Mbps", rtt, up, down, jitter, loss)


def with_trace(link: LinkProfile, up_mbps: float | None, down_mbps: float | None,
               rtt_ms: float | None) -> LinkProfile:
    """The link with a device trace's measured numbers in place of the profile's."""
    if up_mbps is None and down_mbps is None and rtt_ms is None:
        return link
    return LinkProfile(f"{link.name}+trace", rtt_ms if rtt_ms is not None else link.rtt_ms,
                       up_mbps if up_mbps is not None else link.up_mbps,
                       down_mbps if down_mbps is not None else link.down_mbps, link.jitter_ms, link.loss)


def jitter_draw(seed: int, round: int, who: str, what: str) -> float:
    """A standard normal variate for one transfer, the same wherever it is computed (simulator, super node, edge
    node): seeded by a hash of (run seed, round, whose link, which transfer)."""
    digest = hashlib.sha256(f"{seed}/{round}/{who}/{what}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).gauss(0.0, 1.0)
