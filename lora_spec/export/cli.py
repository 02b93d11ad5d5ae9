"""`lora-export`: a thin command line over `lora_spec.export.merge_onnx`.

Exit status: 0 merged (or listed with --dry-run), 1 bad input, 2 bad arguments, 3 no LoRA branch
found, 4 verification failed. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EPILOG = """\
exit status: 0 merged, 1 bad input, 2 bad arguments, 3 no LoRA branch found, 4 verification failed.

examples:
  lora-export --merge model.onnx                      # writes model.merged.onnx (+ .data), verified
  lora-export --merge model.onnx --dry-run            # list the LoRA branches that would be folded
  lora-export --merge base.onnx --adapter run/adapter:0.7 --adapter other:0.3 -o merged.onnx
  lora-export --merge model.onnx --input-shape input_ids=1,128 --tolerance 1e-3
"""


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, separator, dims = text.rpartition("=")
    try:
        shape = tuple(int(dim) for dim in dims.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not separator or not name or not shape:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=DIMS: write e.g. input_ids=1,128")
    return name, shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fold the LoRA branches of an ONNX model (or PEFT adapter files) into its base weights, so "
                    "inference costs what the base model costs. The input is never modified; the output is "
                    "written atomically and verified against the original in onnxruntime.")
    parser.add_argument("--merge", metavar="MODEL", required=True,
                        help="the .onnx model to merge (external data is read from its folder)")
    parser.add_argument("-o", "--output", metavar="PATH",
                        help="where to write the merged model (default: <name>.merged.onnx beside MODEL; external "
                             "data goes to PATH.data)")
    parser.add_argument("--adapter", metavar="DIR[:WEIGHT]", action="append", default=[],
                        help="a PEFT adapter directory to merge into the base weights, optionally weighted "
                             "(default 1.0); repeat to merge several")
    parser.add_argument("--allow-partial", action="store_true",
                        help="merge the adapter keys that match the graph and list the rest, instead of failing")
    parser.add_argument("--no-verify", dest="verify", action="store_const", const="off",
                        help="skip the verification of the merged model")
    parser.add_argument("--verify", dest="verify", choices=("auto", "full", "layers"),
                        help="full: run original and merged in onnxruntime on the same random inputs (with "
                             "--adapter, whose merge changes the outputs: run the merged model and require finite "
                             "outputs); layers: check each folded layer against its LoRA branch in NumPy "
                             "(memory-bounded); auto (default): full up to 1 GiB of weights when three copies fit in "
                             "half the free memory, else layers")
    parser.add_argument("--tolerance", type=float, metavar="T",
                        help="largest allowed max |difference| / max |output| (default 1e-4; 1e-2 for "
                             "float16/bfloat16 weights); above it nothing is written")
    parser.add_argument("--input-shape", type=_input_shape, action="append", default=[], metavar="NAME=DIMS",
                        help="dims of a model input for verification, e.g. input_ids=1,128 (default: dynamic "
                             "dims set to 2); repeat for several inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs (default 0)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be merged and write nothing")
    parser.set_defaults(verify="auto")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lora-export`; returns the exit status."""
    arguments = build_parser().parse_args(argv)
    try:
        from lora_spec.export import ExportError, merge_onnx

        result = merge_onnx(arguments.merge, arguments.output, adapters=arguments.adapter,
                            allow_partial=arguments.allow_partial, verify=arguments.verify,
                            tolerance=arguments.tolerance, input_shapes=dict(arguments.input_shape),
                            dry_run=arguments.dry_run, progress=not arguments.quiet, seed=arguments.seed)
    except ImportError as error:
        print(f"lora-export: error: {error}", file=sys.stderr)
        return 1
    except ExportError as error:
        print(f"lora-export: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(f"lora-export: error: {error.strerror or error} ({error.filename or arguments.merge}): check the "
              "paths and free disk space.", file=sys.stderr)
        return 1
    if arguments.dry_run or not arguments.quiet:
        print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
