"""A tiny BERT model folder and labelled text files, built offline for the fine-tuning tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

WORDS = (
    "good",
    "great",
    "happy",
    "love",
    "nice",
    "bad",
    "awful",
    "sad",
    "hate",
    "poor",
    "table",
    "chair",
    "door",
    "paper",
    "window",
)
LABELS = ("positive",) * 5 + ("negative",) * 5 + ("neutral",) * 5


def rows(repeat: int = 4) -> list[tuple[str, str]]:
    """`(text, label)` rows: every word alone and with a neutral neighbour, `repeat` times over."""
    single = list(zip(WORDS, LABELS, strict=True))
    pairs = [(f"{word} {WORDS[10 + i % 5]}", label) for i, (word, label) in enumerate(single)]
    return (single + pairs) * repeat


def write_csv(
    path: Path, rows_: list[tuple[str, str]] | None = None, header: tuple[str, str] = ("text", "label")
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows() if rows_ is None else rows_)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT of width 16 with a WordPiece tokenizer over `WORDS`, saved with save_pretrained."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(folder)
    return folder
