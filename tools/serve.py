"""Start NVIDIA Triton Inference Server on a model repository from deeplab-triton-repo (serving.launcher).

    deeplab-serve --repo out/triton [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

Every endpoint is bound to 127.0.0.1 (free ports where none is given). Waits until model "deeplab"
is ready, prints the endpoints, and stops the server (and its model processes) on Ctrl-C or
SIGTERM; a model process that dies is replaced by restarting the server on the same ports. Exit
status 1 with the reason (and the server's last log lines) when it cannot start.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from serving.contract import MODEL_NAME
from serving.launcher import ServerError, start_server, stop_server, wait

from .cli import int_in, plain_warnings


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="the repository folder (deeplab-triton-repo --out)")
    for name in ("http", "grpc", "metrics"):
        ap.add_argument(f"--{name}-port", type=int_in(1, 65535), help="default: a free port")
    ap.add_argument("--tritonserver", metavar="PATH", help="the tritonserver binary (or its install folder)")
    ap.add_argument("--model-env", metavar="DIR", help="the model's packages (numpy < 2, OpenCV, ONNX Runtime) "
                    "instead of the cached environment")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model (default 300)")
    args = ap.parse_args(argv)
    if not (Path(args.repo) / MODEL_NAME / "config.pbtxt").is_file():  # before any server starts
        ap.error(f"--repo {args.repo}: not a repository with model {MODEL_NAME!r} "
                 "(write one with deeplab-triton-repo MODEL --out DIR)")
    return args


def main(argv=None) -> int:
    plain_warnings()
    args = parse_args(argv)

    def on_signal(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: another must not cut the cleanup short
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        return _serve(args)
    except KeyboardInterrupt:  # before the server was ready
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(args: argparse.Namespace) -> int:
    try:
        server = start_server(args.repo, args.http_port, args.grpc_port, args.metrics_port,
                              args.tritonserver, args.model_env, args.timeout)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(f"model {MODEL_NAME!r} ready\n  HTTP     {server.http_url}\n  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n  log      {server.log_path}\n(Ctrl-C stops it)", flush=True)
        status = wait(server)
        print(f"error: tritonserver exited with status {status}; its log ends:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        stop_server(server)

if __name__ == "__main__":
    sys.exit(main())
