"""Labelled text for fine-tuning: the VADER lexicon, any CSV or JSONL of `text,label`, and the split.

Every loader checks the whole file before returning, so a bad row stops the command before any
model is loaded or trained, with one line naming the file, the row and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# VADER's mean human rating runs from -4 (most negative) to +4. Words rated within one point of
# neutral are mostly mild or mixed ("hmm", "joke"), so the classes are: negative <= -1 < neutral
# < 1 <= positive. On the lexicon's 7,520 entries this gives 3,250 / 1,690 / 2,580 examples: the
# smallest class is still 22%, so no class is a rounding error and chance accuracy is 43%.
VADER_NEGATIVE_AT_MOST = -1.0
VADER_POSITIVE_AT_LEAST = 1.0
VADER_LABELS = ("negative", "neutral", "positive")
VADER_FILE = "vader_lexicon.txt"


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels indexing `label_names`; `source` says where they came from."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return TextDataset(tuple(self.texts[i] for i in indices), self.labels[indices], self.label_names, self.source)

    def class_counts(self) -> dict[str, int]:
        """Examples per label name, in label order."""
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {name: int(count) for name, count in zip(self.label_names, counts, strict=True)}


def vader_class(mean_rating: float) -> str:
    """The class of a VADER mean rating under the documented thresholds."""
    if mean_rating <= VADER_NEGATIVE_AT_MOST:
        return "negative"
    if mean_rating >= VADER_POSITIVE_AT_LEAST:
        return "positive"
    return "neutral"


def vader_lexicon_path() -> Path:
    """`vader_lexicon.txt` inside the installed `vaderSentiment` package."""
    try:
        import vaderSentiment
    except ImportError:
        raise ValueError(
            'the default data set needs the vaderSentiment package: pip install "lora-spec[demo]", '
            "or pass --data FILE with text,label rows."
        ) from None
    return Path(vaderSentiment.__file__).resolve().parent / VADER_FILE


def load_vader(path: str | os.PathLike | None = None) -> TextDataset:
    """The VADER lexicon (token, mean rating, std, ten ratings per line) as three classes."""
    path = Path(path) if path is not None else vader_lexicon_path()
    if not path.is_file():
        raise ValueError(f"VADER lexicon {path} does not exist: reinstall vaderSentiment or pass --data FILE.")
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            mean = float(fields[1])
        except (IndexError, ValueError):
            raise ValueError(
                f"{path}:{number} is not a VADER lexicon line (token<TAB>mean rating<TAB>...): "
                "pass the original vader_lexicon.txt."
            ) from None
        texts.append(fields[0])
        labels.append(VADER_LABELS.index(vader_class(mean)))
    return TextDataset(tuple(texts), np.array(labels, dtype=np.int64), VADER_LABELS, f"VADER lexicon ({path.name})")


def load_table(
    path: str | os.PathLike, labels: Sequence[str] | None = None, text_column: str = "text", label_column: str = "label"
) -> TextDataset:
    """A CSV (with a header row) or JSONL (one object per line) file of texts and labels.

    `labels` fixes the label names and their order; a row with another label is an error.
    Without it the names are the labels found, sorted (numerically when they are all integers).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"data file {path} does not exist: pass a CSV or JSONL file with {text_column},{label_column}."
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path, text_column, label_column)
    elif suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path, text_column, label_column)
    else:
        raise ValueError(f"data file {path} has suffix {path.suffix!r}: use a .csv or .jsonl file.")
    if not rows:
        raise ValueError(f"data file {path} has no rows: add {text_column},{label_column} rows.")
    found = {label for _, label, _ in rows}
    if labels is None:
        label_names = tuple(sorted(found, key=_label_order))
    else:
        label_names = tuple(labels)
        repeated = sorted({name for name in label_names if label_names.count(name) > 1})
        if repeated or not all(name.strip() for name in label_names):
            raise ValueError(f"--labels {','.join(label_names)} is invalid: list each label once, none empty.")
        for _, label, where in rows:
            if label not in label_names:
                raise ValueError(
                    f"{where} has label {label!r}, which is not one of --labels "
                    f"{','.join(label_names)}: fix the row or add the label."
                )
    if len(found) < 2:
        raise ValueError(f"data file {path} has only the label {found.pop()!r}: a classifier needs at least two.")
    index = {name: i for i, name in enumerate(label_names)}
    return TextDataset(
        tuple(text for text, _, _ in rows),
        np.array([index[label] for _, label, _ in rows], np.int64),
        label_names,
        path.name,
    )


def _label_order(label: str) -> tuple[int, float | str]:
    try:
        return 0, float(int(label))
    except ValueError:
        return 1, label


def _checked_row(where: str, text: object, label: object, text_column: str) -> tuple[str, str, str]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has an empty or non-text {text_column!r} ({text!r}): give every row a text.")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise ValueError(f"{where} has label {label!r}: use a non-empty string or an integer.")
    return text, str(label).strip(), where


def _read_csv(path: Path, text_column: str, label_column: str) -> list[tuple[str, str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        missing = [name for name in (text_column, label_column) if name not in columns]
        if missing:
            raise ValueError(
                f"{path} has columns {', '.join(map(repr, columns)) or '(none)'} but no {missing[0]!r}: "
                f"add a header row with {text_column},{label_column} (or pass --text-column/--label-column)."
            )
        return [
            _checked_row(f"{path}:{reader.line_num}", row[text_column], row[label_column], text_column)
            for row in reader
        ]


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[tuple[str, str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON ({error.msg}): write one JSON object per line.") from None
        if not isinstance(record, dict):
            raise ValueError(
                f'{where} is not a JSON object: write one {{"{text_column}": ..., "{label_column}": ...}} per line.'
            )
        missing = [name for name in (text_column, label_column) if name not in record]
        if missing:
            raise ValueError(
                f"{where} has keys {', '.join(map(repr, record)) or '(none)'} but no {missing[0]!r}: "
                f"give every line {text_column} and {label_column} (or pass --text-column/--label-column)."
            )
        rows.append(_checked_row(where, record[text_column], record[label_column], text_column))
    return rows


def stratified_split(labels: np.ndarray, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(train indices, validation indices)`, each class split in the same proportion.

    Each class gives `round(n * validation_fraction)` examples to validation, at least one and
    at most `n - 1`, so both splits see every class. The draw depends only on `labels` and
    `seed`; both index arrays come back sorted, so the file's order is kept.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation fraction {validation_fraction!r} is invalid: use a number between 0 and 1.")
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 2:
            raise ValueError(
                f"class {int(label)} has {len(members)} example: every class needs at least 2 "
                "(one to train on, one to validate)."
            )
        count = min(max(round(len(members) * validation_fraction), 1), len(members) - 1)
        validation.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of about `size` examples keeping the class proportions (at least 2 per class)."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, validation = stratified_split(labels, size / len(labels), seed)
    return validation
