"""CPU per call at ordinary rates (issue 16): edgefilter against the floor, open loop at fixed rates.

At saturation the event loop batches work (one wake-up serves several connections), so CPU per
call there hides the per-call overhead a real PBX pays at ordinary rates: every call wakes the
loop on its own, and everything done per call (log line, timers, tasks, call-log wake-ups) is
paid in full. This runs the load generator at fixed rates (default 20 and 100 calls/s) against
long-lived servers, one after the other and round after round so that the machine's moods hit
them alike, and reports CPU ms per call (utime + stime of the server's process tree from /proc
over the run, divided by the calls answered) as min and median over the rounds, with its kernel
part, latency p50/p99, the other load on the machine and the load average. It also reports each
server's idle CPU per second (background tasks), which costs ``idle / rate`` per call.

The servers are *variants*: the floor (bench/floor.py), and ``edgefilter serve`` with the default
config (decision log lines on stderr, into a file; call log in SQLite) on the same list database.
More variants compare a change in the same run: another source tree (``src=DIR``, e.g. the
previous commit's ``src/``), another config (``config=TOML``), environment (``env=K=V``) or
Python (``python=PATH``), or command-line arguments (``args=...``: ``--uvloop`` runs the floor on
uvloop). A variant is ``NAME|key=value|...``; ``kind=floor`` (or the name ``floor``) makes it a floor.

    python bench/cpu_rate.py --size 1000000 --rates 20,100 --duration 20 --rounds 3
    python bench/cpu_rate.py --variant 'before|src=/tmp/before/src' --variant 'edgefilter'
    python bench/cpu_rate.py --variant floor --variant 'asyncio|env=EDGEFILTER_UVLOOP=0' --variant edgefilter

Servers run on core 0 and the load generator on core 1 (as in bench/run.py). Prints a Markdown
table and, with ``--out``, the JSON of every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import population  # noqa: E402
import run as harness  # noqa: E402


@dataclass
class Variant:
    """One server to measure: the floor or an ``edgefilter serve``, and how it differs."""

    name: str
    kind: str = "edgefilter"  # or "floor"
    src: str = ""  # a source tree (its src/ directory) put first on PYTHONPATH
    env: dict[str, str] = field(default_factory=dict)
    config: str = ""  # TOML appended to the service's config
    python: str = sys.executable
    args: list[str] = field(default_factory=list)  # appended to the command line (floor: --uvloop)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, *parts = spec.split("|")
        v = cls(name, kind="floor" if name == "floor" else "edgefilter")
        for part in parts:
            key, _, value = part.partition("=")
            if key == "env":
                k, _, val = value.partition("=")
                v.env[k] = val
            elif key == "config":
                v.config += value.replace("\\n", "\n") + "\n"
            elif key in ("kind", "src", "python"):
                setattr(v, key, value)
            elif key == "args":
                v.args += value.split()
            else:
                raise SystemExit(f"unknown variant key {key!r} in {spec!r}")
        return v


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def kernel_seconds(pid: int) -> float:
    """stime of the process tree: the kernel's share (sockets, epoll, writes to the log)."""
    total = 0
    for p in harness.tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                total += int(f.read().rsplit(")", 1)[1].split()[12])
        except OSError:
            pass
    return total / harness.CLK_TCK


def idle_cpu_per_s(pid: int, seconds: float) -> float:
    """CPU seconds per second the server uses with no calls (its background tasks)."""
    c0, t0 = harness.cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (harness.cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def one(pid: int, port: int, size: int, rate: float, duration: float, cores: set[int] | None, seed: int) -> dict:
    """One open-loop run against one server: its CPU per call and the latency. Every run has its
    own ``seed``, so its callers are new to the server (as in bench/run.py: the uncached case)."""
    k0 = kernel_seconds(pid)
    r = harness.measure(pid, port, size, cores, rate=rate, duration=duration, concurrency=64, seed=seed,
                        pool=min(65536, int(rate * duration) + 64))
    k1 = kernel_seconds(pid)
    s = harness.summary(r["times_ms"])
    n = r["completed"]
    return {
        "calls": n,
        "errors": r["errors"],
        "cpu_ms_per_call": r["server_cpu_s"] * 1000 / n if n else None,
        "kernel_ms_per_call": (k1 - k0) * 1000 / n if n else None,
        "p50": s["p50"],
        "p99": s["p99"],
        "other_load": round(r["background_cores"], 2),
        "loadavg": loadavg(),
        "actions": r["actions"],
    }


def start(v: Variant, work: Path, db: Path, cores: set[int] | None, load_timeout: float) -> tuple[subprocess.Popen, int]:
    port = harness.free_port()
    env = {**os.environ, **v.env}
    if v.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [v.src, env.get("PYTHONPATH", "")]))
    if v.kind == "floor":
        cmd = [v.python, str(HERE / "floor.py"), "--port", str(port), *v.args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=harness._pin(cores), env=env)
        timeout = 20.0
    else:
        cfg = harness.write_config(work, db, port)
        if v.config:
            cfg.write_text(cfg.read_text() + v.config)
        log = work / f"{v.name}-{port}.log"
        cmd = [v.python, "-m", "edgefilter", "serve", "--config", str(cfg), *v.args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                                preexec_fn=harness._pin(cores), cwd=str(work), env=env)
        timeout = load_timeout
    try:
        harness.wait_port(port, proc, timeout)
    except Exception:
        harness.stop(proc)
        raise
    return proc, port


def measure_rates(work: Path, size: int, rates: list[float], duration: float, rounds: int, variants: list[Variant], *,
                  idle: float = 5.0, settle: float = 2.0, load_timeout: float = 900.0, say=print) -> dict:
    """Each round: every rate, every variant in turn; one long-lived server per variant."""
    ncores = os.cpu_count() or 1
    server_cores, client_cores = ({0}, {1}) if ncores >= 2 else (None, None)
    db = work / f"lists-{size}.db"
    if not db.exists():
        say(f"building a list of {size:,} entries")
        population.build_database(str(db), size)
    out: dict = {"size": size, "rates": rates, "duration": duration, "rounds": rounds, "cores": ncores,
                 "variants": [vars(v) for v in variants], "samples": {}, "idle_cpu_ms_per_s": {}}
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for v in variants:
            say(f"starting {v.name} ({v.kind}) on {size:,} entries")
            procs[v.name] = start(v, work, db, server_cores, load_timeout)
        time.sleep(settle)  # the services' post-load work (gc, snapshot) out of the way
        for v in variants:  # warm up: first connections, imports on first use
            proc, port = procs[v.name]
            harness.measure(proc.pid, port, size, client_cores, rate=100, duration=1, concurrency=64)
        if idle:
            for v in variants:
                out["idle_cpu_ms_per_s"][v.name] = round(idle_cpu_per_s(procs[v.name][0].pid, idle) * 1000, 3)
        seed = 100
        for i in range(rounds):
            for rate in rates:
                seed += 1  # each variant gets the same callers in a round, none seen before
                for v in variants:
                    proc, port = procs[v.name]
                    r = one(proc.pid, port, size, rate, duration, client_cores, seed)
                    out["samples"].setdefault(f"{v.name}@{rate:g}", []).append(r)
                    say(f"round {i + 1}/{rounds} {v.name:12s} {rate:5g}/s: {r['cpu_ms_per_call']:.3f} ms CPU/call "
                        f"(kernel {r['kernel_ms_per_call']:.3f}), p50 {r['p50']:.2f} p99 {r['p99']:.2f} ms, "
                        f"other load {r['other_load']}, loadavg {r['loadavg']}")
    finally:
        for proc, _ in procs.values():
            harness.stop(proc)
    out["summary"] = summarise(out["samples"])
    return out


def summarise(samples: dict[str, list[dict]]) -> dict:
    res = {}
    for key, rs in samples.items():
        cpu = [r["cpu_ms_per_call"] for r in rs if r["cpu_ms_per_call"] is not None]
        res[key] = {
            "cpu_min": round(min(cpu), 3),
            "cpu_median": round(statistics.median(cpu), 3),
            "kernel_median": round(statistics.median(r["kernel_ms_per_call"] for r in rs), 3),
            "p50_median": round(statistics.median(r["p50"] for r in rs), 3),
            "p99_median": round(statistics.median(r["p99"] for r in rs), 3),
            "other_load_median": round(statistics.median(r["other_load"] for r in rs), 2),
            "loadavg": [r["loadavg"] for r in rs],
            "errors": sum(sum(r["errors"].values()) for r in rs),
        }
    return res


def markdown(result: dict) -> str:
    lines = ["| server | rate/s | CPU ms/call min / median | kernel part (median) | p50 / p99 ms (median) | other load (median) "
             "| load average (first .. last) | idle CPU ms/s |",
             "| --- | ---: | --- | ---: | --- | ---: | --- | ---: |"]
    for key, s in result["summary"].items():
        name, rate = key.rsplit("@", 1)
        idle = result["idle_cpu_ms_per_s"].get(name)
        lines.append(f"| {name} | {rate} | {s['cpu_min']:.3f} / {s['cpu_median']:.3f} | {s['kernel_median']:.3f} "
                     f"| {s['p50_median']:.2f} / {s['p99_median']:.2f} | {s['other_load_median']} "
                     f"| {s['loadavg'][0]} .. {s['loadavg'][-1]} | {'-' if idle is None else f'{idle:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000, help="list entries (bench/population.py)")
    ap.add_argument("--rates", default="20,100", help="comma-separated calls per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per variant, rate and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME|key=value|...: keys src, env (K=V), config (TOML, \\n for new lines), python, args, kind "
                         "(default: floor and edgefilter)")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement per server (0 = skip)")
    ap.add_argument("--work", default=None, help="directory for the list database (kept and reused when given)")
    ap.add_argument("--out", default=None, help="JSON output file")
    a = ap.parse_args(argv)
    variants = [Variant.parse(s) for s in (a.variant or ["floor", "edgefilter"])]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("variant names must differ")
    tmp = tempfile.TemporaryDirectory(prefix="edgefilter-cpu-") if a.work is None else None
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        result = measure_rates(work, a.size, [float(r) for r in a.rates.split(",")], a.duration, a.rounds, variants,
                               idle=a.idle, say=say)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(markdown(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
