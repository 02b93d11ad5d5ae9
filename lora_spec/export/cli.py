"""`lora-export`: a thin command line over `merge_onnx`, `make_switchable` and `pack_adapter`, one mode per call.

Exit status: 0 done (or listed with --dry-run), 1 bad input, 2 bad arguments, 3 no LoRA branch
found, 4 verification failed. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_spec.export.merge import MergeResult
    from lora_spec.export.pack import PackResult
    from lora_spec.export.switchable import SwitchableResult

EPILOG = """\
exit status: 0 done, 1 bad input, 2 bad arguments, 3 no LoRA branch found, 4 verification failed.

examples:
  lora-export --merge model.onnx                      # writes model.merged.onnx (+ .data), verified
  lora-export --merge model.onnx --dry-run            # list the LoRA branches that would be folded
  lora-export --merge base.onnx --adapter run/adapter:0.7 --adapter other:0.3 -o merged.onnx
  lora-export --merge model.onnx --input-shape input_ids=1,128 --tolerance 1e-3
  lora-export --switchable base.onnx --adapter sentiment/adapter --adapter topic/adapter
                                                      # base.switchable.onnx: LoRA factors as inputs
  lora-export --pack base.switchable.onnx --adapter sentiment/adapter -o sentiment.onnx_adapter
  lora-export --pack base.switchable.onnx --adapter sentiment/adapter:0.7 \
              --adapter topic/adapter:0.3 -o mix.onnx_adapter
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
        prog="lora-export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Deploy LoRA in ONNX. --merge folds the LoRA branches of a model (or PEFT adapter files) into its "
        "base weights, so inference costs what the base model costs. --switchable makes the LoRA factors "
        "inputs that onnxruntime overrides per run, and --pack writes adapter folders as an onnxruntime "
        "adapter file (.onnx_adapter) for it, so one session serves many adapters. The input is never "
        "modified; the output is written atomically and verified in onnxruntime.",
    )
    modes = parser.add_mutually_exclusive_group(required=True)
    modes.add_argument(
        "--merge", metavar="MODEL", help="the .onnx model to merge (external data is read from its folder)"
    )
    modes.add_argument(
        "--switchable",
        metavar="MODEL",
        help="the .onnx model whose LoRA branches (exported in it, or the targets of --adapter "
        "folders) get factors as overridable inputs <module path>.lora_A/.lora_B, rank 0 "
        "(the base model) by default",
    )
    modes.add_argument(
        "--pack",
        metavar="SERVED",
        help="a model written by --switchable: write the --adapter folders as one onnxruntime adapter "
        "file (-o NAME.onnx_adapter) holding every factor input of SERVED",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where to write the result (--merge: default <name>.merged.onnx beside MODEL; "
        "--switchable: default <name>.switchable.onnx; external data goes to PATH.data; --pack: "
        "required, the .onnx_adapter file)",
    )
    parser.add_argument(
        "--adapter",
        metavar="DIR[:WEIGHT]",
        action="append",
        default=[],
        help="a PEFT adapter directory to merge into the base weights (--merge) or to pack (--pack), "
        "optionally weighted (default 1.0), or whose target modules become switchable "
        "(--switchable, no weight); repeat for several",
    )
    parser.add_argument(
        "--keep-default",
        action="store_true",
        help="--switchable: the factors default to those the model was exported with, instead of "
        "rank 0 (the base model)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="merge (or make switchable, or pack) the adapter keys that match the graph and list the "
        "rest, instead of failing",
    )
    parser.add_argument(
        "--no-verify", dest="verify", action="store_const", const="off", help="skip the verification of the output"
    )
    parser.add_argument(
        "--verify",
        dest="verify",
        choices=("auto", "full", "layers"),
        help="full: run original and merged in onnxruntime on the same random inputs (with "
        "--adapter, whose merge changes the outputs: run the merged model and require finite "
        "outputs); layers: check each folded layer against its LoRA branch in NumPy "
        "(memory-bounded); auto (default): full up to 1 GiB of weights when three copies fit in "
        "half the free memory, else layers. --switchable (the model without adapter against "
        "the original) and --pack (the served model with the adapter file against the base "
        "merged with the same adapters) take full or auto (full, or no check above 1 GiB)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        metavar="T",
        help="largest allowed max |difference| / max |output| (default 1e-4; 1e-2 for "
        "float16/bfloat16 weights); above it nothing is written",
    )
    parser.add_argument(
        "--input-shape",
        type=_input_shape,
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="dims of a model input for verification, e.g. input_ids=1,128 (default: dynamic "
        "dims set to 2); repeat for several inputs",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs (default 0)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be merged, made switchable or packed, and write nothing"
    )
    parser.set_defaults(verify="auto")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")
    return parser


def _mode_error(arguments: argparse.Namespace) -> str | None:
    """Why the flags do not fit the mode, or None."""
    if arguments.keep_default and not arguments.switchable:
        return "--keep-default applies to --switchable only"
    if arguments.verify == "layers" and not arguments.merge:
        return "--verify layers applies to --merge only: use --verify full, or --no-verify"
    if arguments.pack and not arguments.output:
        return "--pack needs -o NAME.onnx_adapter, the adapter file to write"
    if arguments.pack and not arguments.adapter:
        return "--pack needs at least one --adapter DIR[:WEIGHT]"
    return None


def _run(arguments: argparse.Namespace) -> MergeResult | SwitchableResult | PackResult:
    from lora_spec.export import make_switchable, merge_onnx, pack_adapter

    common = dict(
        allow_partial=arguments.allow_partial,
        verify=arguments.verify,
        tolerance=arguments.tolerance,
        input_shapes=dict(arguments.input_shape),
        dry_run=arguments.dry_run,
        progress=not arguments.quiet,
        seed=arguments.seed,
    )
    if arguments.switchable:
        return make_switchable(
            arguments.switchable,
            arguments.output,
            adapters=arguments.adapter,
            keep_default=arguments.keep_default,
            **common,
        )
    if arguments.pack:
        return pack_adapter(arguments.pack, arguments.adapter, arguments.output, **common)
    return merge_onnx(arguments.merge, arguments.output, adapters=arguments.adapter, **common)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lora-export`; returns the exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    problem = _mode_error(arguments)
    if problem:
        parser.error(problem)
    model = arguments.merge or arguments.switchable or arguments.pack
    try:
        from lora_spec.export import ExportError

        result = _run(arguments)
    except ImportError as error:
        print(f"lora-export: error: {error}", file=sys.stderr)
        return 1
    except ExportError as error:
        print(f"lora-export: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(
            f"lora-export: error: {error.strerror or error} ({error.filename or model}): check the "
            "paths and free disk space.",
            file=sys.stderr,
        )
        return 1
    if arguments.dry_run or not arguments.quiet:
        print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
