"""Process memory as Linux reports it, for the benchmarks: current and peak RSS, and a peak reset."""

from __future__ import annotations


def rss_mb(field: str = "VmHWM") -> float:
    """VmRSS (now) or VmHWM (peak since start or the last reset) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets the peak-RSS mark, so that a phase is measured alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
