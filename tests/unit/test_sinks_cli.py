"""`modstream review-sink` / `dataset-sink`: options, defaults, and the clear refusal of a
dataset folder another sink holds (no Kafka needed for either)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modstream.cli import build_parser, main
from review.dataset import ReviewedDataset
from review.sinks_cli import cmd_dataset_sink, cmd_review_sink


def test_sink_subcommands_parse_with_the_documented_defaults() -> None:
    review = build_parser().parse_args(["review-sink"])
    assert review.func is cmd_review_sink
    assert (review.bootstrap, review.redis, review.group, review.topic) == (
        "127.0.0.1:19092", "redis://127.0.0.1:16379/0", "modstream-review-sink", "review",
    )  # fmt: skip
    dataset = build_parser().parse_args(["dataset-sink", "--out", "x", "--evidence", "s3://b/p", "--metrics-port", "0"])
    assert dataset.func is cmd_dataset_sink
    assert (dataset.group, dataset.topic, dataset.out, dataset.evidence, dataset.metrics_port) == (
        "modstream-dataset-sink", "reviewed", "x", "s3://b/p", 0,
    )  # fmt: skip
    assert build_parser().parse_args(["dataset-sink"]).evidence == "var/evidence"
    assert build_parser().parse_args(["dataset-sink"]).out == "var/reviewed"


def test_dataset_sink_refuses_a_folder_another_sink_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder = ReviewedDataset(tmp_path)
    try:
        code = main(["dataset-sink", "--out", str(tmp_path), "--bootstrap", "127.0.0.1:1", "--metrics-port", "0"])
    finally:
        holder.close()
    assert code == 2
    assert "another dataset sink" in capsys.readouterr().err
