"""GPU facts through NVML (the `pynvml` module of nvidia-ml-py), in base units.

With no NVIDIA driver, no GPU, or no pynvml, `GpuReader.read()` returns an empty list and nothing breaks.
"""

from __future__ import annotations

import logging
from typing import Any

from guardian.events import GpuFacts

log = logging.getLogger("guardian")


class GpuReader:
    """Reads memory, utilization, temperature and power of chosen GPUs (by NVML index or PCI bus id)."""

    def __init__(self, pci_bus_ids: list[str] | None = None) -> None:
        self._nvml: Any = None
        self._handles: list[tuple[int, Any]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:
            log.debug("NVML unavailable (%s); no GPU metrics", exc)
            return
        self._nvml = pynvml
        try:
            if pci_bus_ids:
                handles = [pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode()) for bus in pci_bus_ids]
                self._handles = [(pynvml.nvmlDeviceGetIndex(h), h) for h in handles]
            else:
                count = pynvml.nvmlDeviceGetCount()
                self._handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        except Exception as exc:
            log.warning("Guardian: NVML could not open the GPUs (%s); no GPU metrics", exc)
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def read(self) -> list[GpuFacts]:
        """The facts of each GPU: memory_used_bytes, memory_total_bytes, utilization_ratio, temperature_celsius,
        power_watts (each present only if NVML answers for it)."""
        return [GpuFacts(gpu=index, **self._facts(handle)) for index, handle in self._handles]

    def _facts(self, handle: Any) -> dict[str, float]:
        nvml, facts = self._nvml, {}
        readers = {
            "memory": lambda: nvml.nvmlDeviceGetMemoryInfo(handle),
            "utilization": lambda: nvml.nvmlDeviceGetUtilizationRates(handle),
            "temperature_celsius": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "power_watts": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        }
        for name, read in readers.items():
            try:
                value = read()
            except Exception:
                continue
            if name == "memory":
                facts["memory_used_bytes"] = float(value.used)
                facts["memory_total_bytes"] = float(value.total)
            elif name == "utilization":
                facts["utilization_ratio"] = value.gpu / 100.0
            else:
                facts[name] = float(value)
        return facts
