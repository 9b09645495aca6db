"""The audit trail on a real broker: every act of a person besides a decision (dismissing an
escalation, requeueing or dropping a dead-lettered item, user and token changes) is a schema-
valid record on the append-only `audit` topic, written before the act; with Kafka down the
act is refused and nothing changes."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import PASSWORD, Console, audit_records, escalate_behind_the_console
from tests.e2e.test_review_escalations import escalate
from tests.integration.stack import REPO_ROOT, free_loopback_ports


def dead_letter(console: Console, text: str) -> tuple[str, str]:
    """A post that exhausted its deliveries (max 1, claim timeout 1 s); (post id, dead id)."""
    post_id = console.enqueue(text, image=None)
    assert console.api("POST", "/api/v1/claim")[1]["item"]["post_id"] == post_id
    time.sleep(1.3)
    assert console.api("POST", "/api/v1/claim", token=console.reviewer_token)[1] == {"item": None}
    dead = console.api("GET", "/api/v1/admin/dead")[1]["dead_letters"]
    (entry,) = [d for d in dead if d["post_id"] == post_id]
    return post_id, entry["id"]


def test_dismissals_requeues_and_drops_are_audited(start_console: Any) -> None:
    console = start_console(claim_timeout=1, max_deliveries=1)
    escalated_post = escalate(console, "dismiss me", "spam?")
    (entry,) = console.api("GET", "/api/v1/admin/escalated")[1]["escalated"]
    assert console.api("POST", f"/api/v1/admin/escalated/{entry['id']}/dismiss")[0] == 200
    dropped_post, dropped_id = dead_letter(console, "drop me")
    assert console.api("DELETE", f"/api/v1/admin/dead/{dropped_id}")[0] == 200
    requeued_post, requeued_id = dead_letter(console, "requeue me")
    assert console.api("POST", f"/api/v1/admin/dead/{requeued_id}/requeue")[0] == 200
    assert console.api("GET", "/api/v1/admin/dead")[1]["dead_letters"] == []

    for post_id, action, detail in (
        (requeued_post, "dead_requeued", {"dead_id": requeued_id}),
        (dropped_post, "dead_dropped", {"dead_id": dropped_id}),
        (escalated_post, "escalation_dismissed", {"escalation_id": entry["id"], "escalated_by": "alice"}),
    ):
        (record,) = audit_records(console.bootstrap, post_id, 1)
        assert record["action"] == action and record["actor"] == "root", record
        assert detail.items() <= record["detail"].items(), record
        assert "text" not in json.dumps(record["detail"]), "an audit record carries no post text"


def test_user_and_token_changes_are_audited_with_the_shell_user(start_console: Any, users_file: Any) -> None:
    console = start_console()
    name = f"audited{free_loopback_ports(1)[0]}"
    base = [sys.executable, "-m", "modstream.cli", "review"]
    common = ["--users", str(users_file[0]), "--bootstrap", console.bootstrap]
    for args, stdin in (
        (["add-user", name, "--password-stdin"], PASSWORD + "\n"),
        (["token", name, "--label", "ci"], None),
        (["set-password", name, "--password-stdin"], "another long password\n"),
        (["remove-user", name], None),
    ):
        done = subprocess.run([*base, *args, *common], input=stdin, text=True, capture_output=True, cwd=REPO_ROOT)
        assert done.returncode == 0, done.stderr
    records = audit_records(console.bootstrap, name, 4)
    assert [r["action"] for r in records] == ["user_added", "token_issued", "password_set", "user_removed"]
    assert {r["actor"] for r in records} == {f"cli:{getpass.getuser()}"}
    assert records[1]["detail"] == {"label": "ci"}
    assert PASSWORD not in json.dumps(records) and "mst_" not in json.dumps(records)


def test_with_kafka_down_a_dismissal_or_a_drop_is_refused_and_changes_nothing(
    start_console: Any, tmp_path: Path
) -> None:
    (nothing_there,) = free_loopback_ports(1)
    console = start_console(bootstrap=f"127.0.0.1:{nothing_there}", claim_timeout=1, max_deliveries=1)
    post_id = console.enqueue("escalated before Kafka went away", image=None)

    escalate_behind_the_console(console, post_id)  # while Kafka was up
    (entry,) = console.api("GET", "/api/v1/admin/escalated")[1]["escalated"]
    status, answer = console.api("POST", f"/api/v1/admin/escalated/{entry['id']}/dismiss")
    assert status == 503 and answer["retry"] is True and "audit" in answer["error"], answer
    assert console.api("GET", "/api/v1/admin/escalated")[1]["escalated"] == [entry]

    _, dead_id = dead_letter(console, "a dead letter while Kafka is down")
    for method, path in (
        ("DELETE", f"/api/v1/admin/dead/{dead_id}"),
        ("POST", f"/api/v1/admin/dead/{dead_id}/requeue"),
    ):
        status, answer = console.api(method, path)
        assert status == 503 and "audit" in answer["error"], answer
    assert [d["id"] for d in console.api("GET", "/api/v1/admin/dead")[1]["dead_letters"]] == [dead_id]
