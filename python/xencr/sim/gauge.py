"""The simulator's own instrumentation (not XAPI's): how many VDI exports and imports a pool is
serving at once, and the most it ever served together since it was started, so tests can
check a client's per-pool limits from the pool's side (``sim.transfer_gauge``)."""

from __future__ import annotations

import threading


class TransferGauge:
    """Transfers running now and the peak, per kind ("export", "import")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._peak: dict[str, int] = {}

    def begin(self, kind: str) -> None:
        with self._lock:
            n = self._running.get(kind, 0) + 1
            self._running[kind] = n
            self._peak[kind] = max(self._peak.get(kind, 0), n)

    def end(self, kind: str) -> None:
        with self._lock:
            self._running[kind] = self._running.get(kind, 0) - 1

    def describe(self) -> dict[str, int]:
        """``{"exports": n, "exports_peak": n, "imports": n, "imports_peak": n}``."""
        with self._lock:
            out = {}
            for kind in ("export", "import"):
                out[f"{kind}s"] = self._running.get(kind, 0)
                out[f"{kind}s_peak"] = self._peak.get(kind, 0)
            return out
