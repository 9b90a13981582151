"""HTTP load through the real Envoy: what do extauthz's hops cost per request?

Set-ups run one after another, each on the reference ``envoy/envoy.yaml`` with its routes
replaced by a ``direct_response`` 200 (no upstream cost):

  a. Envoy alone (ext_authz and ext_proc removed): the ceiling;
  b. Envoy + a no-op grpc.aio ext_authz server (``noop_authz.py``): the floor of a Check hop;
  c. Envoy + ``extauthz serve`` with ``bench-policy.yaml`` and the memory store: the real Check;
  d. the same with a private ``redis-server`` as the store: one Redis round trip per Check;
  e. Envoy + the no-op server as ext_proc only (headers and the buffered response body): the
     floor of a Process stream;
  f. Envoy + the no-op server as both ext_authz and ext_proc: the floor of two hops;
  g. the full pipeline, two hops: ``extauthz serve`` as ext_authz and ext_proc on a KServe route
     whose direct_response is a 10-class answer; wrk POSTs one instance per request; limits,
     detectors, keyed noise, rounding and watermarks all run (``bench-pipeline-policy.yaml``);
  h. the same pipeline in one hop (``envoy/envoy-single-hop.yaml``: ext_proc decides alone);
  i. set-up d with ``--workers 2``: compare its CPU per request with d's (1 worker);
  j. set-up b, the no-op answering with the guard's allow answer (headers, RateLimit fields,
     metadata): the floor of a Check hop that answers what the guard answers.

The access log is dropped in all of them, so the numbers are filters and hops, not disk writes.
Envoy runs with ``--concurrency 1``; wrk with one thread and N connections for D seconds after a
warm-up. Beside requests/s and latency, each set-up reports the server's CPU time per request
(user + system of the guard or no-op process and its children, from /proc, over the measured
run): on a 2-core machine shared with Envoy and wrk, CPU per request is the figure that does not
depend on who got the cores. c/b is what extauthz's decision work costs over the Python floor;
d/c what the shared store adds.

Run as ``python -m tests.bench.run_bench [--duration 10] [--connections 8] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from extauthz.demo.stack import (
    ENVOY_SINGLE_HOP_YAML,
    ENVOY_YAML,
    Ports,
    Process,
    StackError,
    free_port,
    python_env,
    render_envoy_config,
    start_envoy,
    start_guard,
    start_process,
    wait_tcp,
)

_HERE = Path(__file__).resolve().parent
NOOP_AUTHZ = _HERE / "noop_authz.py"
BENCH_POLICY = _HERE / "bench-policy.yaml"
_HCM = "envoy.filters.network.http_connection_manager"
_EXT_AUTHZ = "envoy.filters.http.ext_authz"
_EXT_PROC = "envoy.filters.http.ext_proc"
_WARMUP_S = 2
_JSON_MARKER = "BENCH_JSON "

# wrk calls done() once with the merged statistics; latencies are in microseconds. wrk counts a
# status >= 400 as errors.status (its "Non-2xx or 3xx responses" line).
_WRK_DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"duration_us":%d,"requests":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,'
    .. '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,'
    .. '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    "%MARKER%", summary.duration, summary.requests, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
""".replace("%MARKER%", _JSON_MARKER)

SETUPS: dict[str, str] = {
    "a": "envoy alone",
    "b": "envoy + noop grpc.aio authz",
    "c": "envoy + extauthz Check (memory)",
    "d": "envoy + extauthz Check (redis)",
    "e": "envoy + noop grpc.aio ext_proc",
    "f": "envoy + noop authz + noop ext_proc",
    "g": "full pipeline, two hops (memory)",
    "h": "full pipeline, single hop (memory)",
    "i": "envoy + extauthz Check (redis, 2 workers)",
    "j": "envoy + noop authz, the guard's answer",
}
#: Set-ups whose Envoy keeps the ext_authz filter, and those that keep ext_proc.
_WITH_AUTHZ = frozenset("bcdfgij")
_WITH_PROC = frozenset("efgh")
_NOOP = frozenset("befj")
#: Set-ups that POST a KServe instance to a model route and get a 10-class answer.
_PIPELINE = frozenset("gh")
#: Set-ups on the single-hop Envoy config, and those whose guard uses Redis.
_SINGLE_HOP = frozenset("h")
_REDIS = frozenset("di")
PIPELINE_POLICY = _HERE / "bench-pipeline-policy.yaml"
MODEL_PATH = "/v1/models/digits:predict"
_ANSWER = json.dumps(
    {"predictions": [[0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.55]]}
)
_POST_LUA = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '%BODY%'
"""
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run, in the units people read: requests/s and milliseconds."""

    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int

    @classmethod
    def from_done(cls, done: dict[str, Any]) -> WrkResult:
        """Build from the JSON the Lua ``done`` hook prints."""
        duration_s = done["duration_us"] / 1e6
        return cls(
            requests=int(done["requests"]),
            duration_s=duration_s,
            requests_per_s=done["requests"] / duration_s if duration_s > 0 else 0.0,
            p50_ms=done["p50_us"] / 1e3,
            p90_ms=done["p90_us"] / 1e3,
            p99_ms=done["p99_us"] / 1e3,
            max_ms=done["max_us"] / 1e3,
            non_2xx=int(done["errors_status"]),
            socket_errors=int(
                done["errors_connect"]
                + done["errors_read"]
                + done["errors_write"]
                + done["errors_timeout"]
            ),
        )


@dataclass(frozen=True, slots=True)
class SetupResult:
    """The outcome of one set-up: a wrk result, or the error that stopped it."""

    setup: str
    label: str
    result: WrkResult | None = None
    ext_authz_stats: dict[str, int] = field(default_factory=dict)
    server_cpu_us_per_request: float | None = None
    """User + system CPU of the server process tree per request of the measured run."""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What every set-up shares."""

    duration_s: int
    connections: int
    path: str
    headers: tuple[str, ...]
    workdir: Path


def parse_wrk_output(text: str) -> WrkResult:
    """Return the result printed by the Lua ``done`` hook in wrk's output."""
    for line in text.splitlines():
        if line.startswith(_JSON_MARKER):
            return WrkResult.from_done(json.loads(line[len(_JSON_MARKER) :]))
    raise ValueError(f"no {_JSON_MARKER.strip()} line in wrk output:\n{text[-2000:]}")


def wrk_binary() -> str:
    """Find wrk or say how to install it."""
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk not found: install it with `apt-get install wrk`")
    return found


def run_wrk(url: str, *, duration_s: int, opts: BenchOptions, script: Path) -> WrkResult:
    """Run wrk (1 thread, N connections) against ``url`` and parse its result."""
    argv = [
        wrk_binary(),
        "-t1",
        f"-c{opts.connections}",
        f"-d{duration_s}s",
        "--latency",
        "--timeout",
        "2s",
        "-s",
        str(script),
    ]
    for header in opts.headers:
        argv += ["-H", header]
    argv.append(url)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 30, check=False
    )
    if done.returncode != 0:
        raise StackError(f"wrk exited with {done.returncode}: {done.stderr or done.stdout}")
    return parse_wrk_output(done.stdout)


def bench_transform(
    *, authz: bool, proc: bool = False, body: str = "ok\n"
) -> Callable[[dict[str, Any]], None]:
    """Return a config transform: direct_response 200 routes answering ``body``, no access log,
    and only the ext_authz (``authz``) and ext_proc (``proc``) filters asked for."""
    drop = {name for name, keep in ((_EXT_AUTHZ, authz), (_EXT_PROC, proc)) if not keep}
    headers = (
        [{"header": {"key": "content-type", "value": "application/json"}}]
        if body.startswith("{")
        else []
    )

    def transform(config: dict[str, Any]) -> None:
        for listener in config["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                for net_filter in chain["filters"]:
                    if net_filter["name"] != _HCM:
                        continue
                    hcm = net_filter["typed_config"]
                    hcm.pop("access_log", None)
                    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in drop]
                    hcm["route_config"]["virtual_hosts"] = [
                        {
                            "name": "bench",
                            "domains": ["*"],
                            "routes": [
                                {
                                    "match": {"prefix": "/"},
                                    "direct_response": {
                                        "status": 200,
                                        "body": {"inline_string": body},
                                    },
                                    "response_headers_to_add": headers,
                                }
                            ],
                        }
                    ]

    return transform


def tree_cpu_s(pid: int) -> float:
    """Return the user + system CPU seconds of ``pid`` and its live descendants (/proc)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, ..., utime (14), stime (15).
        fields = text[text.rindex(")") + 2 :].split()
        child, parent = int(entry.name), int(fields[1])
        children.setdefault(parent, []).append(child)
        times[child] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += times.get(current, 0.0)
        stack.extend(children.get(current, ()))
    return total


def ext_authz_stats(admin_port: int) -> dict[str, int]:
    """Return Envoy's ext_authz counters (ok / denied / error ...), to show the hop really ran."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{admin_port}/stats?filter=ext_authz"
    with opener.open(url, timeout=2.0) as response:
        text = response.read().decode()
    stats: dict[str, int] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\S+): (\d+)", line.strip())
        if match:
            stats[match.group(1)] = int(match.group(2))
    return stats


@contextmanager
def _authz_server(setup: str, grpc_port: int, workdir: Path) -> Iterator[Process | None]:
    """Start the ext_authz server of a set-up (none for a) and stop it afterwards."""
    if setup == "a":
        yield None
        return
    if setup in _NOOP:
        argv = [sys.executable, str(NOOP_AUTHZ), str(grpc_port)]
        if setup == "j":
            argv.append("--guard-answer")
        proc = start_process(f"noop-authz-{grpc_port}", argv, workdir=workdir, env=python_env())
        try:
            wait_tcp(grpc_port, timeout_s=15.0, proc=proc)
        except BaseException:
            proc.stop()
            raise
    else:
        with ExitStack() as resources:
            store = "memory"
            if setup in _REDIS:
                redis_port = free_port()
                resources.enter_context(_redis_server(redis_port, workdir))
                store = f"redis://127.0.0.1:{redis_port}/0"
            workers = ("--workers", "2") if setup == "i" else ()
            policy = BENCH_POLICY
            if setup in _PIPELINE:
                policy = _pipeline_policy(workdir)
            # No drain period: nothing routes to this guard once the run is over.
            proc = start_guard(
                policy=policy,
                grpc_port=grpc_port,
                http_port=free_port(),
                workdir=workdir,
                extra_args=("--drain-s", "0", "--store", store, *workers),
            )
            with proc:
                yield proc
        return
    with proc:
        yield proc


def _pipeline_policy(workdir: Path) -> Path:
    """Copy the full-pipeline policy into ``workdir`` beside its coverage reference."""
    from extauthz.demo.workspace import write_coverage_reference

    write_coverage_reference(workdir / "coverage-reference.npy")
    policy = workdir / PIPELINE_POLICY.name
    shutil.copyfile(PIPELINE_POLICY, policy)
    return policy


def pipeline_script(workdir: Path) -> Path:
    """Write the wrk script that POSTs one held-out digit as a KServe instance."""
    from extauthz.demo.model import load_data

    row = load_data()[1][0].tolist()
    body = json.dumps({"instances": [row]})
    script = workdir / "pipeline.lua"
    script.write_text(_POST_LUA.replace("%BODY%", body) + _WRK_DONE_LUA, encoding="utf-8")
    return script


@contextmanager
def _redis_server(port: int, workdir: Path) -> Iterator[Process]:
    """A private redis-server for set-up d (``apt-get install redis-server`` if missing)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server not found: apt-get install redis-server (or make redis)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = start_process(f"redis-{port}", argv, workdir=workdir)
    with proc:
        wait_tcp(port, timeout_s=10.0, proc=proc)
        yield proc


def run_setup(setup: str, *, base_id: int, opts: BenchOptions, script: Path) -> SetupResult:
    """Start the processes of one set-up, warm up, measure, stop everything."""
    label = SETUPS[setup]
    ports = Ports.free()
    pipeline = setup in _PIPELINE
    transform = bench_transform(
        authz=setup in _WITH_AUTHZ,
        proc=setup in _WITH_PROC,
        body=_ANSWER if pipeline else "ok\n",
    )
    source = ENVOY_SINGLE_HOP_YAML if setup in _SINGLE_HOP else ENVOY_YAML
    config = render_envoy_config(ports, source=source, transform=transform)
    url = f"http://127.0.0.1:{ports.listener}{MODEL_PATH if pipeline else opts.path}"
    if pipeline:
        script = pipeline_script(opts.workdir)
    cpu_per_request = None
    try:
        with ExitStack() as stack:
            server = stack.enter_context(_authz_server(setup, ports.guard, opts.workdir))
            stack.enter_context(
                start_envoy(
                    config,
                    workdir=opts.workdir,
                    base_id=base_id,
                    admin_port=ports.admin,
                    concurrency=1,
                )
            )
            run_wrk(url, duration_s=_WARMUP_S, opts=opts, script=script)
            before = ext_authz_stats(ports.admin)
            cpu_before = tree_cpu_s(server.pid) if server is not None else 0.0
            result = run_wrk(url, duration_s=opts.duration_s, opts=opts, script=script)
            if server is not None and result.requests > 0:
                cpu = tree_cpu_s(server.pid) - cpu_before
                cpu_per_request = cpu / result.requests * 1e6
            after = ext_authz_stats(ports.admin)
    except (StackError, OSError, subprocess.TimeoutExpired, ValueError) as err:
        return SetupResult(setup=setup, label=label, error=f"{type(err).__name__}: {err}")
    # Counters of the measured run only, without the warm-up.
    delta = {name: after[name] - before.get(name, 0) for name in after if after[name]}
    return SetupResult(
        setup=setup,
        label=label,
        result=result,
        ext_authz_stats=delta,
        server_cpu_us_per_request=cpu_per_request,
    )


def ratios(results: Sequence[SetupResult]) -> dict[str, float]:
    """Return ratios of requests/s, p50/p99 and CPU per request where both set-ups ran."""
    by_setup = {r.setup: r.result for r in results if r.result is not None}
    cpu = {r.setup: r.server_cpu_us_per_request for r in results}
    out: dict[str, float] = {}
    for num, den in (
        ("c", "b"),
        ("c", "j"),
        ("j", "b"),
        ("d", "b"),
        ("d", "c"),
        ("b", "a"),
        ("c", "a"),
        ("e", "a"),
        ("f", "a"),
        ("g", "e"),
        ("g", "f"),
        ("h", "e"),
        ("h", "g"),
        ("i", "d"),
    ):
        top, bottom = by_setup.get(num), by_setup.get(den)
        if top is None or bottom is None:
            continue
        if bottom.requests_per_s > 0:
            out[f"{num}/{den}_requests_per_s"] = top.requests_per_s / bottom.requests_per_s
        if bottom.p50_ms > 0:
            out[f"{num}/{den}_p50"] = top.p50_ms / bottom.p50_ms
        if bottom.p99_ms > 0:
            out[f"{num}/{den}_p99"] = top.p99_ms / bottom.p99_ms
        top_cpu, bottom_cpu = cpu.get(num), cpu.get(den)
        if top_cpu is not None and bottom_cpu:
            out[f"{num}/{den}_cpu_per_request"] = top_cpu / bottom_cpu
    return out


def format_table(results: Sequence[SetupResult], ratio: dict[str, float]) -> str:
    """Render results and ratios as a plain-text table."""
    lines = [
        f"{'setup':<36} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'sock err':>8}"
        f" {'cpu us/req':>10}"
    ]
    for r in results:
        name = f"{r.setup}. {r.label}"
        if r.result is None:
            lines.append(f"{name:<36} FAILED: {(r.error or '').splitlines()[0][:120]}")
            continue
        w = r.result
        cpu = "-" if r.server_cpu_us_per_request is None else f"{r.server_cpu_us_per_request:.0f}"
        lines.append(
            f"{name:<36} {w.requests_per_s:>10.0f} {w.p50_ms:>8.3f} {w.p99_ms:>8.3f}"
            f" {w.non_2xx:>8d} {w.socket_errors:>8d} {cpu:>10}"
        )
    for key in ("c/b", "c/j", "d/b", "d/c", "b/a", "h/e", "h/g", "i/d"):
        rps, p50 = ratio.get(f"{key}_requests_per_s"), ratio.get(f"{key}_p50")
        cpu = ratio.get(f"{key}_cpu_per_request")
        if rps is not None and p50 is not None:
            cpu_text = "" if cpu is None else f", cpu/req x{cpu:.3f}"
            lines.append(f"ratio {key}: req/s x{rps:.3f}, p50 x{p50:.3f}{cpu_text}")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"), help="output")
    parser.add_argument(
        "--setups", default="abcdefghij", help="which set-ups to run, e.g. 'ab' (default: all)"
    )
    parser.add_argument("--path", default="/", help="request path (default: /)")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        help="extra request header for wrk, e.g. 'x-api-key: bench' (repeatable)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep configs and logs here (default: temp)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.setups) - set(SETUPS)
    if unknown or not args.setups:
        parser.error(f"--setups takes letters from {''.join(SETUPS)}")
    if args.duration < 1 or args.connections < 1:
        parser.error("--duration and --connections must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen set-ups, print a table, write JSON; return 1 if any set-up failed."""
    args = _parse_args(argv)
    wrk_binary()
    with tempfile.TemporaryDirectory(prefix="extauthz-bench-") as tmp:
        workdir = args.workdir.resolve() if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        script = workdir / "done.lua"
        script.write_text(_WRK_DONE_LUA, encoding="utf-8")
        opts = BenchOptions(
            duration_s=args.duration,
            connections=args.connections,
            path=args.path,
            headers=tuple(args.header),
            workdir=workdir,
        )
        # Distinct --base-id per Envoy, away from other Envoys on this host (tests, the demo).
        base = 1000 + (os.getpid() % 10_000) * 4
        results = []
        for index, setup in enumerate(dict.fromkeys(args.setups)):
            print(f"running {setup}. {SETUPS[setup]} ...", file=sys.stderr, flush=True)
            results.append(run_setup(setup, base_id=base + index, opts=opts, script=script))
    ratio = ratios(results)
    print(format_table(results, ratio))
    report = {
        "started_unix_s": time.time(),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": sys.version},
        "options": {
            "duration_s": args.duration,
            "connections": args.connections,
            "warmup_s": _WARMUP_S,
            "path": args.path,
            "envoy_concurrency": 1,
            "wrk_threads": 1,
        },
        "results": [
            {
                "setup": r.setup,
                "label": r.label,
                "result": asdict(r.result) if r.result else None,
                "ext_authz_stats": r.ext_authz_stats,
                "server_cpu_us_per_request": r.server_cpu_us_per_request,
                "error": r.error,
            }
            for r in results
        ],
        "ratios": ratio,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}", file=sys.stderr)
    for r in results:
        if r.error:
            print(f"\n{r.setup}. {r.label} failed:\n{r.error}", file=sys.stderr)
    if any(r.error for r in results) and args.workdir is None:
        print("(logs were in a temporary directory: rerun with --workdir DIR)", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
