"""Write a Triton model repository serving a DeepLab model (serving.repository).

    deeplab-triton-repo models/deeplab_shapes.onnx --out out/triton
    deeplab-serve --repo out/triton

An .onnx becomes model "deeplab" on the CPU (Python backend running runtime.Segmenter, dynamic
batching); a TensorRT .engine/.plan becomes the GPU form. Exit status 2 with the reason when the
model or the output folder will not do, 1 when the repository written fails Triton's own checks.
"""
from __future__ import annotations

import argparse
import sys

from serving.contract import DEFAULT_MAX_ITERATIONS, DEFAULT_MAX_PIXELS
from serving.repository import DEFAULT_QUEUE_DELAY_US, DEFAULT_QUEUE_TIMEOUT_S, write_repository

from .cli import int_at_least, plain_warnings


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an .onnx from deeplab-export (or a TensorRT .engine/.plan)")
    ap.add_argument("--out", required=True, help="the repository folder (model 'deeplab' is written or replaced in it)")
    ap.add_argument("--instances", type=int_at_least(1), default=1, help="model instances (processes), default 1")
    ap.add_argument("--max-batch", type=int_at_least(1), default=8, help="Triton's max_batch_size, default 8")
    ap.add_argument("--queue-delay-us", type=int_at_least(0), default=DEFAULT_QUEUE_DELAY_US,
                    help=f"dynamic batching: most microseconds a request waits for others (default {DEFAULT_QUEUE_DELAY_US})")
    ap.add_argument("--crf-params", metavar="FILE", help="JSON CRF parameters: the model's default CRF")
    ap.add_argument("--no-crf", action="store_true", help="the CRF off unless a request turns it on")
    ap.add_argument("--max-pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS,
                    help=f"a request with more pixels (N x H x W) is refused (default {DEFAULT_MAX_PIXELS})")
    ap.add_argument("--max-iterations", type=int_at_least(0), default=DEFAULT_MAX_ITERATIONS,
                    help=f"the most CRF iterations a request may ask for (default {DEFAULT_MAX_ITERATIONS})")
    ap.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT_S, metavar="SECONDS",
                    help="a request still waiting for the model after this is refused (503), "
                    f"default {DEFAULT_QUEUE_TIMEOUT_S:g}")
    args = ap.parse_args(argv)
    if args.no_crf and args.crf_params:
        ap.error("--no-crf and --crf-params contradict each other")
    return args


def main(argv=None) -> int:
    plain_warnings()
    args = parse_args(argv)
    try:
        folder = write_repository(args.model, args.out, instances=args.instances, max_batch=args.max_batch,
                                  crf_params=args.crf_params, no_crf=args.no_crf,
                                  queue_delay_us=args.queue_delay_us, max_pixels=args.max_pixels,
                                  max_iterations=args.max_iterations, queue_timeout_s=args.queue_timeout)
    except (ValueError, OSError) as e:  # RepositoryError and ModelFormatError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    try:  # Triton's own model-config schema, where tritonclient (the serve extra) is installed
        from serving.config_check import ConfigError, validate_repository

        validate_repository(args.out)
        print("checked against Triton's model configuration schema")
    except ImportError:
        pass
    except ConfigError as e:
        print(f"error: the repository written does not pass Triton's checks: {e}", file=sys.stderr)
        return 1
    print(f"serve it: deeplab-serve --repo {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
