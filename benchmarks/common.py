"""Helpers shared by the benchmark scripts: statistics, tables, load accounting, workers.

Imports only the standard library and numpy, because the same file runs in
every contender's interpreter (the system python, and the diffusers-Flax 0.39
venv made by ``setup_peer.sh``).

A contender runs in its own long-lived worker process that answers one JSON
line per request on its stdout; the driver sends the same request to every
worker in turn, so the contenders are measured interleaved under the same
background load, each in a warm process of its own (no thread pools fighting
over the cores, no imports of one stack perturbing another).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- statistics


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the raw samples (seconds) of repeated timings."""
    ts = [float(t) for t in times]
    if not ts:
        return {"n": 0}
    return {
        "n": len(ts),
        "median_s": statistics.median(ts),
        "min_s": min(ts),
        "max_s": max(ts),
        "times_s": ts,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_s(s: float | None) -> str:
    """Seconds for a table cell, in ms below one second."""
    if s is None:
        return "-"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with left-aligned first column and right-aligned others."""
    cols = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(headers))]

    def line(r):
        cells = [str(r[0]).ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "  ".join(cells)

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- host and load


def host_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_at_start": os.getloadavg(),
    }


def _busy_jiffies() -> int:
    """Non-idle jiffies of all CPUs since boot (/proc/stat; 0 where unavailable)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]) - idle


def _proc_jiffies(pid: int) -> int:
    """utime + stime of one process (all its threads), in jiffies."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class LoadMeter:
    """How much of the machine's CPU time went to processes other than ours.

    ``others_cores`` is the average number of cores busy with other work while
    we ran: 0 on an idle machine; on a 2-core machine shared with a test run, 1
    or more, which roughly halves what a benchmark can use.
    """

    def __init__(self, pids: Callable[[], Sequence[int]]):
        self._pids = pids
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start()

    def _ours(self) -> int:
        return sum(_proc_jiffies(p) for p in [os.getpid(), *self._pids()])

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = _busy_jiffies()
        self._ours0 = self._ours()

    def read(self) -> dict[str, float]:
        dt = max(time.monotonic() - self._t0, 1e-9)
        busy = (_busy_jiffies() - self._busy0) / self._tick
        ours = (self._ours() - self._ours0) / self._tick
        return {
            "wall_s": dt,
            "ours_cores": ours / dt,
            "others_cores": max(busy - ours, 0.0) / dt,
            "loadavg": os.getloadavg()[0],
        }


# ---------------------------------------------------------------- worker protocol


def serve(handle: Callable[[dict], dict]) -> None:
    """Run a worker: one JSON request per stdin line, one JSON reply per stdout line.

    Everything else the process prints (library warnings, progress bars, even
    C-level writes to fd 1) is moved to stderr so it cannot corrupt replies.
    """
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        try:
            out = handle(req)
        except Exception as e:  # report, keep serving: one broken item must not end the run
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")
    reply.close()


class Worker:
    """Driver side of :func:`serve`: a contender's process, one request at a time."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict | None = None):
        self.name = name
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env=env,
        )

    def call(self, **req) -> dict:
        if self.proc.poll() is not None:
            return {"error": f"worker exited with code {self.proc.returncode}"}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return {"error": f"worker died (exit code {self.proc.returncode}); see {self.log_path}"}
        return json.loads(line)

    def log_tail(self, n: int = 20) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def worker_env(threads: int | None = None) -> dict[str, str]:
    """The environment for a worker: one real CPU device for JAX, all cores for torch.

    The test suite's ``--xla_force_host_platform_device_count=8`` would split
    the cores into 8 fake devices and shard the pipeline over them; it is
    removed here so every JAX contender runs on the one real CPU device.
    """
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS") or "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # Our own package must import in every interpreter, also a venv without it installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return env


def timed(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes until its result is ready, and the result."""
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0, out
