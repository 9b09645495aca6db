"""`modstream worker --processes N` (stream/worker_processes.py): what each child is started with,
and the host's one /metrics page made of every child's."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.worker_processes import Supervisor, child_argv, merge_metrics


def test_a_child_gets_the_parents_arguments_but_its_own_loopback_port_and_no_processes() -> None:
    argv = ["-v", "worker", "--processes", "3", "--web-host", "0.0.0.0", "--web-port=6066", "--app-id", "w"]
    assert child_argv(argv, 41234) == [
        "-v",
        "worker",
        "--app-id",
        "w",
        "--web-host",
        "127.0.0.1",
        "--web-port",
        "41234",
    ]
    assert child_argv(["worker", "--processes=2"], 1) == ["worker", "--web-host", "127.0.0.1", "--web-port", "1"]


def test_merged_metrics_keep_every_childs_series_apart_and_parse_back() -> None:
    def child(n: float) -> str:
        return (
            "# HELP modstream_posts_total Posts.\n# TYPE modstream_posts_total counter\n"
            f'modstream_posts_total{{route="auto"}} {n}\n'
            "# HELP modstream_info Info.\n# TYPE modstream_info gauge\n"
            'modstream_info{version="a\\"b\\\\c"} NaN\n'
        )

    pages = {0: child(5.0), 1: child(7.0)}
    merged = merge_metrics(pages)
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    posts = {s.labels["worker_process"]: s.value for s in families["modstream_posts"].samples}
    assert posts == {"0": 5.0, "1": 7.0}
    assert merged.count("# TYPE modstream_posts_total counter") == 1
    info = families["modstream_info"].samples
    assert {s.labels["version"] for s in info} == {'a"b\\c'}  # label values escaped and read back
    assert all(s.value != s.value for s in info)  # NaN stays NaN


def test_a_supervisor_of_one_process_is_refused() -> None:
    with pytest.raises(ValueError):
        Supervisor(["worker"], 1, "127.0.0.1", 0)
