"""Wall-clock phases (CUDA-synchronised) and peak memory of a benchmark worker."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class PhaseTimer:
    """Inclusive wall time per named phase, accumulated until `take()` (CUDA-synchronised).

    Phases nest: `stack` holds the phases now open (outermost first). `clock` is injectable for tests."""

    def __init__(self, device: str = "cpu", clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = device
        self.clock = clock
        self.acc: dict[str, float] = {}
        self.stack: list[str] = []

    @contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Time the block under `name`; `None` runs it untimed."""
        if name is None:
            yield
            return
        sync(self.device)
        t0 = self.clock()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            sync(self.device)
            self.acc[name] = self.acc.get(name, 0.0) + self.clock() - t0

    def inside(self, name: str) -> bool:
        return name in self.stack

    def wrap(self, fn: Callable, name_of: Callable[..., str | None]) -> Callable:
        """`fn` timed under `name_of(*args, **kwargs)` (a name, or None for untimed calls)."""

        def timed(*args, **kwargs):
            with self.phase(name_of(*args, **kwargs)):
                return fn(*args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def derived_phases(phases: dict[str, float], step_time: float) -> dict[str, float]:
    """One step's phases plus the derived ones: `gen_other` (the rest of gen_and_score), `train_fwd_bwd`
    (loss_forward + backward) and `optimizer_and_other` (the step minus the three top-level phases)."""
    p = dict(phases)
    inner = ("generate", "sam_encode", "score_masks", "ref_logps")
    p["gen_other"] = p.get("gen_and_score", 0) - sum(p.get(k, 0) for k in inner)
    p["train_fwd_bwd"] = p.get("loss_forward", 0) + p.get("backward", 0)
    p["optimizer_and_other"] = step_time - p.get("gen_and_score", 0) - p["train_fwd_bwd"]
    return p


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def reset_peak_memory(device: str) -> bool:
    """Reset the peak-memory counter; False where the platform does not allow it."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:  # Linux >= 4.0: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: str, reset_ok: bool) -> dict[str, float]:
    mib = 1024.0**2
    out = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # KiB on Linux
    if device == "cuda":
        import torch

        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / mib
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / mib
    elif reset_ok:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["vmhwm_after_warmup_mib"] = int(line.split()[1]) / 1024.0
        except OSError:
            pass
    return out


def memory_figure(mem: dict[str, float]) -> float | None:
    """The figure the tables use: CUDA allocated, else VmHWM after the warm-up, else ru_maxrss."""
    return mem.get("cuda_max_allocated_mib", mem.get("vmhwm_after_warmup_mib", mem.get("ru_maxrss_mib")))
