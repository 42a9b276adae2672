"""Curation blocks on their own, without a cluster."""

import json

from rayllm.data.blocks import (
    EmptyFilter,
    QualityConfig,
    QualityFilter,
    content_hash,
    normalise,
    read_documents,
)


def test_normalise_folds_whitespace_and_controls():
    assert normalise("  Cafe\u0301\x07  au\t\tlait \r\n\n\n\nfin ") == "Café au lait\n\nfin"


def test_quality_filter_reasons():
    rules = QualityFilter(QualityConfig())
    assert rules.filter("To be, or not to be: that is the question.") is None
    assert rules.filter("Exeunt.") == "too_few_words"
    assert rules.filter("### ### ### ### ### ### ###") == "not_alphabetic"
    assert rules.filter("a b c d e f g h i j") == "mean_word_length"
    assert EmptyFilter().filter("") == "no_text"


def test_content_hash_ignores_case_and_spacing():
    assert content_hash("Now is the  winter\nof our discontent") == content_hash(
        "now is the winter of our DISCONTENT"
    )
    assert content_hash("winter") != content_hash("summer")


def test_paragraph_split(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text("ACT I.\n\nHamlet.\nWho's there?\n\n\n   \nBernardo.\nNay, answer me.\n")
    docs = list(read_documents(str(path), split="paragraph", text_field="text"))
    assert [d["text"].strip() for d in docs] == [
        "ACT I.",
        "Hamlet.\nWho's there?",
        "Bernardo.\nNay, answer me.",
    ]


def test_jsonl_bad_lines_become_empty_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [
        json.dumps({"text": "first"}),
        "{not json",
        json.dumps({"body": "no field"}),
        json.dumps({"text": "last"}),
    ]
    path.write_text("\n".join(rows))
    docs = list(read_documents(str(path), split="line", text_field="text"))
    assert [d["text"] for d in docs] == ["first", "", "", "last"]
    assert docs[1]["source"].endswith(":2")


def test_undecodable_bytes_are_counted(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (doc,) = read_documents(str(path), split="file", text_field="text")
    assert doc["bad_bytes"] == 2
