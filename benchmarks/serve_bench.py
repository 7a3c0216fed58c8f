#!/usr/bin/env python3
"""Load benchmark of the DeepLab model served on a real Triton Inference Server.

    python -m benchmarks.serve_bench --model models/deeplab_shapes.onnx --size 321x321 \\
        --concurrency 1,2,4,8 --duration 10 --crf on,off \\
        --json benchmarks/results/serve_bench_321.json --markdown benchmarks/results/serve_bench_321.md
    python -m benchmarks.serve_bench --url 127.0.0.1:8001 --protocol grpc --concurrency 4 --json out/b.json

Writes a repository for --model (serving.repository; into a temporary folder, or --repo DIR)
and starts tritonserver on it (serving.launcher: 127.0.0.1, free ports), stopped at the end, on
Ctrl-C and on error; --url uses a server that already runs instead. Then, for each CRF setting
and each concurrency N, one window: N client threads, each with its own connection
(serving.TritonSegmenter), send the same image back to back for --warmup seconds (not measured),
wait until every request is answered, then again for --duration seconds. Per window: requests
answered, errors (every failed request is counted and its message kept), throughput (answered
requests per second of the window), client wall time per request (p50/p90/p99/max), and from
Triton's inference statistics, read when no request is in flight before and after the measured
part: the server's queue and compute times per request and the average batch of the model's
executions (requests / executions: what dynamic batching gathered). The windows run one after
the other (no alternation); the machine's load average is printed before each. Exit status 1
when any request failed (the reports are still written), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarking.environment import environment, load_average
from benchmarking.latency import format_ms, latency_stats
from serving import launcher
from serving.client import COMPUTE_STEPS, ModelStats, TritonSegmenter
from serving.contract import MODEL_NAME
from serving.repository import RepositoryError, write_repository
from tools.benchmark import parse_on_off, parse_size
from tools.cli import int_at_least, refuse_unwritable, seconds

MAX_CLIENTS = 256
PROTOCOL_NAMES = {"http": "HTTP", "grpc": "gRPC"}
#: Distinct error messages kept per window (all are counted).
KEPT_ERRORS = 5


class BenchError(RuntimeError):
    """The benchmark cannot run (no server to reach), with the reason."""


# -- command line ---------------------------------------------------------------------------------
def parse_concurrency(s: str) -> List[int]:
    """An argparse type: '1,2,4,8' -> [1, 2, 4, 8], each 1..MAX_CLIENTS, none twice."""
    out = []
    for item in (p.strip() for p in s.split(",")):
        try:
            n = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected client counts such as 1,2,4,8, got {s!r}") from None
        if not 1 <= n <= MAX_CLIENTS:
            raise argparse.ArgumentTypeError(f"a client count is 1..{MAX_CLIENTS}, got {n}")
        if n in out:
            raise argparse.ArgumentTypeError(f"{n} given twice in {s!r}")
        out.append(n)
    return out


def parse_crf_settings(s: str) -> List[bool]:
    """An argparse type: 'on,off' -> [True, False], none twice."""
    out = []
    for item in s.split(","):
        v = parse_on_off(item)
        if v in out:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} given twice in {s!r}")
        out.append(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the .onnx to serve (a repository is written for it)")
    ap.add_argument("--repo", metavar="DIR", help="write the repository here (kept) instead of a temporary "
                    "folder; without --model, serve the repository already there")
    ap.add_argument("--instances", type=int_at_least(1), default=1,
                    help="model instances in the written repository (default 1)")
    ap.add_argument("--url", help="host:port of a running server's endpoint for --protocol, instead of "
                    "starting one")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http", help="default http")
    ap.add_argument("--concurrency", type=parse_concurrency, default=[1, 2, 4, 8], metavar="N,N,...",
                    help="client threads per window (default 1,2,4,8)")
    ap.add_argument("--duration", type=seconds(), default=10.0, help="measured seconds per window (default 10)")
    ap.add_argument("--warmup", type=seconds(zero_allowed=True), default=2.0,
                    help="seconds of load before each window (default 2)")
    ap.add_argument("--crf", type=parse_crf_settings, default=[True, False], metavar="on,off",
                    help="CRF settings, in order (default on,off)")
    image = ap.add_mutually_exclusive_group()
    image.add_argument("--size", type=parse_size, help="a generated scene of HxW (default 321x321)")
    image.add_argument("--image", help="an image file, sent at its own size")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--markdown", help="write a Markdown table here")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse combinations argparse cannot see (exit 2 with the reason)."""
    if args.url:
        given = [f"--{o}" for o in ("model", "repo") if getattr(args, o)]
        given += ["--instances"] if args.instances != 1 else []
        if given:
            ap.error(f"--url benchmarks the model that server serves: {', '.join(given)} do not apply")
    elif not args.model and not args.repo:
        ap.error("give --model (or --repo DIR holding a repository, or --url of a running server)")
    elif not args.model and args.instances != 1:
        ap.error("--instances is written into a new repository: it needs --model")
    if args.model and not Path(args.model).is_file():
        ap.error(f"--model {args.model}: no such file")
    refuse_unwritable(ap, {"--json": args.json, "--markdown": args.markdown})


def load_request_image(args: argparse.Namespace, ap: argparse.ArgumentParser):
    """The image every request sends: --image as it is, else a generated scene of --size."""
    if args.image:
        from runtime.contract import load_image
        from runtime.errors import ImageError

        try:
            return load_image(args.image)
        except ImageError as e:
            ap.error(f"--image: {e}")
    from scenes import make_scene

    h, w = args.size or (321, 321)
    return make_scene(0, h, w)[0]


# -- the server's statistics ------------------------------------------------------------------------
def stats_delta(before: dict, after: dict, client_requests: int) -> dict:
    """What the server did between two snapshots, per request: queue and compute ms (a request's
    compute is that of the execution that ran it, shared with the rest of its batch), and the
    average batch (requests / executions). ``requests`` counts Triton's successes and failures:
    Triton 2.51 counts a request the Python model answers with an error response as a success.
    ``other_requests``: the server's count minus the requests sent (answered or failed); above 0,
    another client used the model (the times are then not this load's alone), below 0, requests
    that never reached the model."""
    requests = (after["success"][0] - before["success"][0]) + (after["fail"][0] - before["fail"][0])
    executions = after["execution_count"] - before["execution_count"]
    inferences = after["inference_count"] - before["inference_count"]

    def per_request_ms(name: str) -> Optional[float]:
        return (after[name][1] - before[name][1]) / requests / 1e6 if requests else None

    steps = {f"{name}_ms": per_request_ms(name) for name in COMPUTE_STEPS}
    batches = {str(size): n - before["batches"].get(size, 0) for size, n in sorted(after["batches"].items())
               if n - before["batches"].get(size, 0) > 0}
    return {"requests": requests, "failed": after["fail"][0] - before["fail"][0], "executions": executions,
            "avg_batch": inferences / executions if executions else None,
            "executions_by_batch_size": batches,
            "queue_ms": per_request_ms("queue"),
            "compute_ms": None if not requests else sum(steps.values()),
            **steps,
            "other_requests": requests - client_requests}


# -- one window -------------------------------------------------------------------------------------
class Window:
    """N client threads sending requests back to back: a warm-up, a drain, the measured part. Each
    thread makes and closes its own TritonSegmenter: tritonclient's HTTP client (gevent) fails
    when used from a thread other than the one that made it."""

    def __init__(self, url: str, protocol: str, crf, clients: int, image, warmup: float):
        self.url, self.protocol, self.crf = url, protocol, crf
        self.clients, self.image, self.warmup = clients, image, warmup
        self.latencies: List[List[float]] = [[] for _ in range(clients)]
        self.errors: List[List[str]] = [[] for _ in range(clients)]
        self.warmup_errors: List[List[str]] = [[] for _ in range(clients)]
        self.setup_error: Optional[str] = None
        self.stop = threading.Event()
        self.warmup_end = self.deadline = 0.0
        # The warm-up starts once every client is connected (and has read the model's config).
        self.connected = threading.Barrier(clients + 1, action=self._start_warmup)
        self.drained = threading.Barrier(clients + 1)
        self.started = threading.Barrier(clients + 1)

    def _start_warmup(self) -> None:
        self.warmup_end = time.perf_counter() + self.warmup

    def _barriers(self) -> tuple:
        return self.connected, self.drained, self.started

    def _send_until(self, seg, deadline: float, latencies: Optional[list], errors: list) -> None:
        while not self.stop.is_set() and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                seg(self.image)
            except Exception as e:  # any failure is an error of the window, counted and reported
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if latencies is not None:
                latencies.append((time.perf_counter() - t0) * 1e3)

    def _client(self, k: int) -> None:
        try:
            seg = TritonSegmenter(self.url, protocol=self.protocol, crf=self.crf)
        except Exception as e:
            self.setup_error = f"client {k} could not connect: {type(e).__name__}: {e}"
            for barrier in self._barriers():
                barrier.abort()
            return
        try:
            self.connected.wait()
            self._send_until(seg, self.warmup_end, None, self.warmup_errors[k])
            self.drained.wait()
            self.started.wait()
            self._send_until(seg, self.deadline, self.latencies[k], self.errors[k])
        except threading.BrokenBarrierError:  # interrupted, or another client could not connect
            pass
        finally:
            with contextlib.suppress(Exception):
                seg.close()

    def run(self, duration: float, stats: ModelStats) -> dict:
        threads = [threading.Thread(target=self._client, args=(k,), daemon=True, name=f"client-{k}")
                   for k in range(self.clients)]
        try:
            for t in threads:
                t.start()
            self.connected.wait()
            self.drained.wait()  # every warm-up request answered: nothing in flight
            before = stats.settled()
            t0 = time.perf_counter()
            self.deadline = t0 + duration
            self.started.wait()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            after = stats.settled()
        except BaseException as e:
            self.stop.set()
            for barrier in self._barriers():
                barrier.abort()
            for t in threads:
                t.join(5.0)
            if isinstance(e, threading.BrokenBarrierError) and self.setup_error:
                raise BenchError(self.setup_error) from None
            raise
        latencies = [v for part in self.latencies for v in part]
        errors = [e for part in self.errors for e in part]
        warmup_errors = [e for part in self.warmup_errors for e in part]
        return {"requests": len(latencies), "errors": len(errors),
                "error_messages": _distinct(errors), "warmup_errors": len(warmup_errors),
                "warmup_error_messages": _distinct(warmup_errors), "wall_s": wall,
                "throughput_rps": len(latencies) / wall,
                "latency_ms": latency_stats(latencies) if latencies else None,
                "server": stats_delta(before, after, len(latencies) + len(errors))}


def _distinct(messages: List[str]) -> List[str]:
    seen: List[str] = []
    for m in messages:
        if m not in seen:
            seen.append(m)
            if len(seen) == KEPT_ERRORS:
                break
    return seen


def _clients(n: int) -> str:
    return f"{n} client{'s' if n > 1 else ''}"


def _loadavg(load) -> str:
    return "unknown" if load is None else " ".join(f"{v:.2f}" for v in load)


def run_windows(url: str, protocol: str, crf_settings: List[bool], concurrency: List[int], warmup: float,
                duration: float, image) -> tuple:
    """Every window (CRF setting by concurrency, in order); returns (server description, windows)."""
    from crf import CRFParams

    try:
        with TritonSegmenter(url, protocol=protocol) as probe:
            crf_on = probe.crf_params or CRFParams()  # the model's defaults; DeepLab's when it has none
    except Exception as e:  # refused connection, no such model, a gRPC port asked over HTTP, ...
        raise BenchError(f"cannot use model {MODEL_NAME!r} at {url} over {protocol}: {type(e).__name__}: {e}") from e
    stats = ModelStats(url, protocol)
    try:
        server = stats.describe()
        windows = []
        total = len(crf_settings) * len(concurrency)
        for crf in crf_settings:
            for clients in concurrency:
                load = load_average()
                label = f"CRF {'on' if crf else 'off'}, {_clients(clients)}"
                print(f"[{len(windows) + 1}/{total}] {label}: load average {_loadavg(load)}", file=sys.stderr,
                      flush=True)
                result = Window(url, protocol, crf_on if crf else None, clients, image, warmup).run(duration, stats)
                result = {"crf": "on" if crf else "off", "clients": clients, "load_average_before": load, **result}
                windows.append(result)
                print(f"[{len(windows)}/{total}] {label}: {progress_line(result)}", file=sys.stderr, flush=True)
        return {**server, "crf_params_on": crf_on.to_dict()}, windows
    finally:
        stats.close()


def progress_line(w: dict) -> str:
    lat, srv = w["latency_ms"], w["server"]
    parts = [f"{w['requests']} requests in {w['wall_s']:.1f} s, {w['throughput_rps']:.2f} req/s"]
    if lat:
        parts.append(f"p50 {format_ms(lat['p50'])} p99 {format_ms(lat['p99'])} ms")
    if srv["avg_batch"] is not None:
        parts.append(f"avg batch {srv['avg_batch']:.2f}")
    parts.append(f"errors {w['errors']}" + (f" (+{w['warmup_errors']} in the warm-up)" if w["warmup_errors"] else ""))
    return ", ".join(parts)


# -- the report -------------------------------------------------------------------------------------
TABLE_COLUMNS = ("CRF", "clients", "req/s", "p50 ms", "p90 ms", "p99 ms", "server queue ms", "server compute ms",
                 "avg batch")


def table_cells(w: dict) -> List[str]:
    lat, srv = w["latency_ms"] or {}, w["server"]
    return [w["crf"], str(w["clients"]), f"{w['throughput_rps']:.2f}", format_ms(lat.get("p50")),
            format_ms(lat.get("p90")), format_ms(lat.get("p99")), format_ms(srv["queue_ms"]),
            format_ms(srv["compute_ms"]),
            "-" if srv["avg_batch"] is None else f"{srv['avg_batch']:.2f}"]


def error_lines(report: Dict[str, Any]) -> List[str]:
    """Every window's failed requests (measured and warm-up) with their messages; a line saying none."""
    lines = []
    for w in report["windows"]:
        for what, n, msgs in (("", w["errors"], w["error_messages"]),
                              (" in the warm-up", w["warmup_errors"], w["warmup_error_messages"])):
            if n:
                lines.append(f"CRF {w['crf']}, {_clients(w['clients'])}: {n} failed request(s){what}: "
                             + "; ".join(msgs))
    if not lines:
        lines.append(f"Errors: none ({sum(w['requests'] for w in report['windows'])} requests answered).")
    return lines


def _footnote(report: Dict[str, Any]) -> str:
    s, env, srv = report["settings"], report["environment"], report["server"]
    return (f"{s['image']}, {PROTOCOL_NAMES[s['protocol']]}, one connection per client, requests back to back; "
            f"{s['duration_s']:g} s per window after {s['warmup_s']:g} s of warm-up. Triton {srv['version']}, "
            f"{', '.join(srv['instances'])}, max batch {srv['max_batch_size']}, queue delay "
            f"{srv['max_queue_delay_us']} us. Latency: client wall time per request; server times: per request, "
            f"from Triton's statistics (compute: the execution that ran it, shared by its batch). "
            f"{env['cpu']}, {env['logical_cores']} logical cores, GPU {env['gpu'] or 'none'}, load average "
            f"before the windows {', '.join(_one_minute_load(w['load_average_before']) for w in report['windows'])}; "
            f"{env['date']}.")


def _one_minute_load(load) -> str:
    return "unknown" if load is None else f"{load[0]:.2f}"


def format_markdown(report: Dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(table_cells(w)) + " |" for w in report["windows"]]
    lines += ["", _footnote(report)] + error_lines(report)
    return "\n".join(lines) + "\n"


def format_console(report: Dict[str, Any]) -> str:
    env, srv = report["environment"], report["server"]
    cells = [list(TABLE_COLUMNS) + ["max ms", "errors"]]
    cells += [table_cells(w) + [format_ms((w["latency_ms"] or {}).get("max")), str(w["errors"])]
              for w in report["windows"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [f"CPU: {env['cpu']}, {env['logical_cores']} logical cores; GPU {env['gpu'] or 'none'}",
             f"Triton {srv['version']} at {report['settings']['url']} ({report['settings']['protocol']}), "
             f"{', '.join(srv['instances'])}, max batch {srv['max_batch_size']}", ""]
    lines += ["  ".join(c.rjust(widths[i]) for i, c in enumerate(row)) for row in cells]
    lines += [""] + error_lines(report)
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    image = load_request_image(args, ap)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        return _run(args, image)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, image) -> int:
    from runtime.output_files import write_bytes_atomically

    env = environment()  # first: the load average before the benchmark's own load
    server = None
    with contextlib.ExitStack() as cleanup:
        url = args.url
        if url is None:
            repo = Path(args.repo) if args.repo else Path(cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="deeplab-serve-bench-")))
            try:
                if args.model:
                    write_repository(args.model, repo, instances=args.instances)
                server = launcher.start_server(repo)
            except (RepositoryError, launcher.ServerError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            cleanup.callback(launcher.stop_server, server)
            url = server.http_url if args.protocol == "http" else server.grpc_url
            print(f"tritonserver ready at {url} ({args.protocol})", file=sys.stderr, flush=True)
        try:
            described, windows = run_windows(url, args.protocol, args.crf, args.concurrency, args.warmup,
                                             args.duration, image)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        restarts = server.restarts if server is not None else None
    h, w = image.shape[:2]
    report = {
        "tool": "deeplab-serve-bench",
        "unit": "ms per request; throughput in answered requests per second of the window",
        "settings": {"model": args.model, "repo": args.repo, "url": url, "started_here": args.url is None,
                     "instances": args.instances if args.url is None else None, "protocol": args.protocol,
                     "concurrency": args.concurrency, "duration_s": args.duration, "warmup_s": args.warmup,
                     "crf": ["on" if c else "off" for c in args.crf], "size": f"{h}x{w}",
                     "image": f"{args.image} ({h}x{w})" if args.image else
                     f"generated scene {h}x{w} (scenes.make_scene, seed 0)"},
        "environment": env,
        "server": {**described, "restarts": restarts},
        "windows": windows,
    }
    print(format_console(report))
    if args.json:
        write_bytes_atomically(args.json, json.dumps(report, indent=2, allow_nan=False).encode())
    if args.markdown:
        write_bytes_atomically(args.markdown, format_markdown(report).encode())
    failed = sum(w["errors"] + w["warmup_errors"] for w in windows)
    if failed:
        print(f"error: {failed} request(s) failed (see the reports)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
