"""Loading labelled text (VADER, CSV, JSONL), its errors, and the stratified seeded split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec.finetune import data
from tests.finetune.tiny import write_csv, write_jsonl


@pytest.mark.parametrize(
    "mean_rating, expected",
    [
        (-4.0, "negative"),
        (-1.0, "negative"),
        (-0.9, "neutral"),
        (0.0, "neutral"),
        (0.9, "neutral"),
        (1.0, "positive"),
        (3.4, "positive"),
    ],
)
def test_vader_class_follows_the_documented_thresholds(mean_rating, expected):
    assert data.vader_class(mean_rating) == expected


def test_load_vader_reads_token_and_mean_rating_of_every_line(tmp_path):
    lexicon = tmp_path / "vader_lexicon.txt"
    lexicon.write_text(":)\t2.0\t0.6\t[2, 2]\nmeh\t-0.5\t0.5\t[0, -1]\n\nugh\t-1.2\t0.4\t[-1, -2]\n", encoding="utf-8")
    dataset = data.load_vader(lexicon)
    assert dataset.texts == (":)", "meh", "ugh")
    assert [dataset.label_names[i] for i in dataset.labels] == ["positive", "neutral", "negative"]


def test_load_vader_names_the_line_that_is_not_a_lexicon_line(tmp_path):
    lexicon = tmp_path / "vader_lexicon.txt"
    lexicon.write_text("good\t1.9\t0.5\t[2]\nbroken line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vader_lexicon.txt:2 is not a VADER lexicon line"):
        data.load_vader(lexicon)


def test_installed_vader_lexicon_gives_the_documented_class_balance():
    pytest.importorskip("vaderSentiment")
    assert data.load_vader().class_counts() == {"negative": 3250, "neutral": 1690, "positive": 2580}


def test_csv_and_jsonl_with_the_same_rows_load_the_same_dataset(tmp_path):
    rows = [("nice day", "pos"), ("awful", "neg"), ("a chair", "neu"), ("love it", "pos")]
    from_csv = data.load_table(write_csv(tmp_path / "rows.csv", rows))
    from_jsonl = data.load_table(
        write_jsonl(tmp_path / "rows.jsonl", [{"text": text, "label": label} for text, label in rows])
    )
    assert from_csv.texts == from_jsonl.texts == tuple(t for t, _ in rows)
    assert from_csv.label_names == from_jsonl.label_names == ("neg", "neu", "pos")
    np.testing.assert_array_equal(from_csv.labels, [2, 0, 1, 2])
    np.testing.assert_array_equal(from_jsonl.labels, from_csv.labels)


def test_integer_labels_are_ordered_numerically(tmp_path):
    records = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 1, 2])]
    dataset = data.load_table(write_jsonl(tmp_path / "rows.jsonl", records))
    assert dataset.label_names == ("1", "2", "10")
    np.testing.assert_array_equal(dataset.labels, [2, 1, 0, 1])


def test_given_labels_fix_the_order_and_the_columns_can_be_renamed(tmp_path):
    path = write_csv(tmp_path / "rows.csv", [("up", "b"), ("down", "a")], header=("sentence", "class"))
    dataset = data.load_table(path, labels=("b", "a", "c"), text_column="sentence", label_column="class")
    assert dataset.label_names == ("b", "a", "c")
    np.testing.assert_array_equal(dataset.labels, [0, 1])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("rows.csv", "sentence,label\nhi,a\n", r"has columns 'sentence', 'label' but no 'text'"),
        ("rows.csv", "text,label\n,a\nhi,b\n", r"rows.csv:2 has an empty or non-text 'text'"),
        ("rows.csv", "text,label\nhi\nho,b\n", r"rows.csv:2 has label None"),
        ("rows.csv", "text,label\n", r"has no rows"),
        ("rows.csv", "text,label\nhi,a\nho,a\n", r"has only the label 'a'"),
        ("rows.jsonl", '{"text": "hi", "label": "a"}\n{"text": "ho"\n', r"rows.jsonl:2 is not valid JSON"),
        ("rows.jsonl", '{"text": "hi", "label": "a"}\n["ho", "b"]\n', r"rows.jsonl:2 is not a JSON object"),
        (
            "rows.jsonl",
            '{"text": "hi", "label": "a"}\n{"txt": "ho", "label": "b"}\n',
            r"rows.jsonl:2 has keys 'txt', 'label' but no 'text'",
        ),
        ("rows.jsonl", '{"text": "hi", "label": true}\n', r"has label True"),
        ("rows.txt", "hi,a\n", r"has suffix '.txt': use a .csv or .jsonl file"),
    ],
)
def test_bad_data_file_fails_with_one_line_naming_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        data.load_table(path)
    assert "\n" not in str(error.value)


def test_unknown_label_is_refused_with_its_row(tmp_path):
    path = write_csv(tmp_path / "rows.csv", [("up", "pos"), ("down", "neg"), ("meh", "neutral")])
    with pytest.raises(ValueError, match=r"rows.csv:4 has label 'neutral', which is not one of --labels pos,neg"):
        data.load_table(path, labels=("pos", "neg"))


@pytest.mark.parametrize("labels", [("pos", "pos"), ("pos", "")])
def test_repeated_or_empty_given_labels_are_refused(tmp_path, labels):
    path = write_csv(tmp_path / "rows.csv", [("up", "pos"), ("down", "neg")])
    with pytest.raises(ValueError, match=r"list each label once, none empty"):
        data.load_table(path, labels=labels)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"data file .*missing.csv does not exist"):
        data.load_table(tmp_path / "missing.csv")


label_arrays = (
    st.lists(st.integers(0, 3), min_size=2, max_size=200)
    .filter(lambda labels: min(np.bincount(labels)[np.unique(labels)]) >= 2)
    .map(lambda labels: np.array(labels))
)


@given(labels=label_arrays, fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_split_is_a_sorted_partition_with_every_class_on_both_sides_in_proportion(labels, fraction, seed):
    train, validation = data.stratified_split(labels, fraction, seed)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), np.arange(len(labels)))
    assert list(train) == sorted(train) and list(validation) == sorted(validation)
    for label in np.unique(labels):
        count = np.sum(labels == label)
        held_out = np.sum(labels[validation] == label)
        assert 1 <= held_out <= count - 1
        assert abs(held_out - count * fraction) <= 0.5 or held_out in (1, count - 1)


@given(labels=label_arrays, seed=st.integers(0, 2**32 - 1))
def test_split_depends_only_on_the_labels_and_the_seed(labels, seed):
    first, second = data.stratified_split(labels, 0.3, seed), data.stratified_split(labels.copy(), 0.3, seed)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_different_seeds_give_different_splits():
    labels = np.repeat([0, 1, 2], 50)
    assert not np.array_equal(data.stratified_split(labels, 0.2, 0)[1], data.stratified_split(labels, 0.2, 1)[1])


def test_stratified_sample_keeps_the_class_proportions():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    sample = data.stratified_sample(labels, 100, seed=0)
    assert np.bincount(labels[sample]).tolist() == [60, 30, 10]


def test_split_refuses_a_class_with_a_single_example():
    with pytest.raises(ValueError, match="has 1 example"):
        data.stratified_split(np.array([0, 0, 1]), 0.5, 0)
