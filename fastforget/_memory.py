"""Size guards for allocations made on the user's behalf: refuse, with the figure, what the device cannot hold."""

import os

import torch


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def available_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on `device` (None where it cannot be told): the CPU's MemAvailable
    (Linux; the free physical pages elsewhere), a CUDA device's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(what: str, nbytes: int, device) -> None:
    """Raise ValueError naming `what` and both figures if `nbytes` exceed the memory available on `device`."""
    device = torch.device(device)
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise ValueError(
            f"{what} needs {format_bytes(nbytes)} on {device}, which has {format_bytes(available)} available"
        )
