import json

import pytest

from models.card import ModelCard
from models.registry import ModelRegistry
from modstream.cli import main
from tests.tiny import tiny_model


def test_import_csv_command_writes_a_manifest(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    csv = tmp_path / "data.csv"
    csv.write_text("pid,body,pic,off\n1,hello,a.png,yes\n2,world,,no\n", encoding="utf-8")
    out = tmp_path / "manifest.jsonl"
    code = main(
        ["import", "csv", str(csv), "--out", str(out), "--id-column", "pid", "--text-column", "body",
         "--image-column", "pic", "--image-dir", str(tmp_path / "img"), "--label", "hate=off",
         "--map", "hate:yes=hateful", "--map", "hate:no=not_hateful"]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["labels"]["hate"] for r in rows] == ["hateful", "not_hateful"]
    assert rows[0]["image"] is not None and rows[1]["image"] is None
    assert "wrote 2 examples" in capsys.readouterr().out


def test_classify_command_runs_the_pipeline_on_every_line(tmp_path, synthetic_small, capsys):
    model, tok = tiny_model()
    registry = tmp_path / "registry"
    itm = {"trained": True, "auroc": 0.9, "routing_lift": {"hate": 2.0}, "threshold": 0.99}
    ModelRegistry(registry).save(model, tok, ModelCard(config=model.config, itm=itm))
    image = synthetic_small[0].image
    (tmp_path / "broken.png").write_bytes(image.read_bytes()[:60])
    posts = tmp_path / "posts.jsonl"
    lines = [
        {"id": "a", "text": "lovely day", "image_urls": [str(image)]},
        {"id": "b", "text": "text only", "image_urls": []},
        {"id": "c", "text": "broken", "image_urls": ["broken.png"]},
        {"id": "d", "text": "private address", "image_urls": ["http://10.1.2.3/x.png"]},
    ]
    posts.write_text(
        "\n".join([json.dumps(x) for x in lines] + ["{not json", json.dumps({"id": 5, "text": "bad id"})]) + "\n"
    )
    out = tmp_path / "labels.jsonl"
    assert main(["classify", str(posts), "--registry", str(registry), "--output", str(out), "--device", "cpu"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    by_id = {r["post_id"]: r for r in records if "labels" in r}
    assert by_id["a"]["model_version"] == "v0001" and by_id["a"]["media"]["status"] == "ok"
    assert by_id["a"]["route"] == "review" and by_id["a"]["reasons"] == ["weak_image_text_match"]  # threshold 0.99
    assert by_id["b"]["itm_match"] is None and by_id["b"]["route"] == "auto"
    assert by_id["c"]["media"]["status"] in {"truncated", "corrupt"} and by_id["c"]["itm_match"] is None
    assert by_id["d"]["media"]["status"] == "blocked_address"  # the worker's SSRF guard, no connection
    dead = [r for r in records if "stage" in r]
    assert len(dead) == 2 and {d["stage"] for d in dead} == {"parse"}
    assert main(["models", "--registry", str(registry)]) == 0
    assert "* v0001" in capsys.readouterr().out


def test_models_set_current_rolls_back_and_refuses_unknown_versions(tmp_path, capsys):
    model, tok = tiny_model()
    registry = ModelRegistry(tmp_path / "registry")
    registry.save(model, tok, ModelCard(config=model.config))
    registry.save(model, tok, ModelCard(config=model.config))
    assert registry.current() == "v0002"
    assert main(["models", "--registry", str(registry.root), "--set-current", "v0001", "--no-publish"]) == 0
    assert registry.current() == "v0001"
    assert "v0002 -> v0001" in capsys.readouterr().out
    assert main(["models", "--registry", str(registry.root), "--set-current", "v0099", "--no-publish"]) == 1
    assert registry.current() == "v0001"
    assert "'v0099' not found" in capsys.readouterr().err


def test_models_set_current_says_when_running_workers_were_not_told(tmp_path, capsys):
    from tests.integration.stack import free_loopback_ports

    model, tok = tiny_model()
    registry = ModelRegistry(tmp_path / "registry")
    registry.save(model, tok, ModelCard(config=model.config))
    registry.save(model, tok, ModelCard(config=model.config))
    (closed,) = free_loopback_ports(1)  # nothing listens: the publish fails
    argv = ["models", "--registry", str(registry.root), "--set-current", "v0001", "--bootstrap", f"127.0.0.1:{closed}"]
    assert main([*argv, "--publish-timeout", "3"]) == 1
    assert registry.current() == "v0001"  # CURRENT moved; the message says the update is missing
    assert "not published" in capsys.readouterr().err


def test_error_lines_never_show_a_redis_password():
    from modstream.cli import _redacted

    assert _redacted("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert _redacted("rediss://user:s3cret@redis/1") == "rediss://user:***@redis/1"
    assert _redacted("redis://127.0.0.1:16379/0") == "redis://127.0.0.1:16379/0"


def _capture_ablation(monkeypatch):
    """Stubs the data and the grid run: records the AblationConfig `ablate` would run."""
    seen = {}

    def fake_run(examples, model_config, cfg, out_dir, **kwargs):
        seen["cfg"] = cfg
        return {"variants": {}, "tasks": []}

    monkeypatch.setattr("trainer.commands._load_examples", lambda args: [])
    monkeypatch.setattr("trainer.ablation.run_ablation", fake_run)
    return seen


def test_ablate_honours_the_loss_weight_flags(tmp_path, monkeypatch):
    seen = _capture_ablation(monkeypatch)
    argv = ["ablate", "--preset", "synthetic", "--out", str(tmp_path), "--device", "cpu"]
    argv += ["--task-weight", "0.5", "--itc-weight", "0.2", "--itm-weight", "0.3", "--aux-weights", "0.05,0.3"]
    argv += ["--unfreeze-text-layers", "all", "--unfreeze-image-blocks", "2"]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.task_weight, cfg.itc_weight, cfg.itm_weight) == (0.5, 0.2, 0.3)
    assert tuple(cfg.aux_weights) == (0.05, 0.3)
    assert cfg.unfreeze_text_layers == -1 and cfg.unfreeze_image_blocks == 2


def test_ablate_refuses_flags_it_would_ignore(tmp_path, monkeypatch, capsys):
    seen = _capture_ablation(monkeypatch)
    base = ["ablate", "--preset", "synthetic", "--out", str(tmp_path), "--device", "cpu"]
    cases = [
        (["--itc-weight", "0"], "trains ITC but --itc-weight is 0"),
        (["--itm-weight", "0", "--only", "task+itm"], "trains ITM but --itm-weight is 0"),
        (["--task-weight", "0"], "--task-weight"),
        (["--negatives", "random"], "sets negatives per variant"),
        (["--text-trainable-layers", "2"], "--unfreeze-text-layers"),
        (["--seed", "3"], "--seeds N"),
        (["--only", "task+nothing"], "unknown variant"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert "cfg" not in seen  # nothing ran
    # Weight 0 for a loss no chosen variant uses is fine.
    assert main([*base, "--itc-weight", "0", "--only", "task", "--only", "task+itm"]) == 0
    assert seen["cfg"].itc_weight == 0


def test_ablate_rejects_malformed_sweeps_and_layer_counts(tmp_path, capsys):
    import pytest

    base = ["ablate", "--preset", "synthetic", "--out", str(tmp_path)]
    for extra in (["--aux-weights", "0.1,x"], ["--aux-weights", "0,0.1"], ["--unfreeze-text-layers", "some"]):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
        assert "expected" in capsys.readouterr().err


def test_ablate_into_another_grids_folder_exits_1_with_the_reason(tmp_path, monkeypatch, capsys):
    from trainer.ablation import AblationSetupError

    def refuse(*args, **kwargs):
        raise AblationSetupError(f"{tmp_path} holds runs of another grid (train.epochs: 25 -> 3)")

    monkeypatch.setattr("trainer.commands._load_examples", lambda args: [])
    monkeypatch.setattr("trainer.ablation.run_ablation", refuse)
    assert main(["ablate", "--preset", "synthetic", "--out", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "another grid" in err and "train.epochs: 25 -> 3" in err


def test_train_passes_the_neighbour_vote_and_refuses_a_bad_one(monkeypatch, capsys):
    from modstream import cli
    from trainer import commands

    seen = {}

    def fake_fit(examples, model_config, train_config, **kwargs):
        seen["config"] = model_config
        raise SystemExit(0)  # stop before training: only the config is under test

    monkeypatch.setattr("trainer.fit.fit", fake_fit)
    monkeypatch.setattr(commands, "_load_examples", lambda args: [])  # no synthetic posts written
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "synthetic", "--neighbour-vote", "0.33"])
    assert seen["config"].neighbour_vote == 0.33
    with pytest.raises(SystemExit) as refused:
        cli.main(["train", "--preset", "synthetic", "--neighbour-vote", "1.5"])
    assert refused.value.code == 2 and "--neighbour-vote: expected a weight in [0, 1)" in capsys.readouterr().err


def test_help_shows_defaults_but_never_a_secret(monkeypatch) -> None:
    """--help says what a run uses unless told otherwise; the Redis URL (it may carry a
    password, from the environment or a secrets file) is never printed."""
    from modstream import settings
    from modstream.cli import build_parser

    monkeypatch.setenv("MODSTREAM_REDIS_URL", "redis://:hunter2-secret@redis.internal:6379/0")
    settings.current.cache_clear()
    try:
        parser = build_parser()
        commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        produce = commands["produce"].format_help()
        assert "(default: 1000)" in " ".join(produce.split()) or "default: 1000" in produce
        assert "(default: 0.0)" in " ".join(produce.split())  # a zero default is shown too
        for name, sub in commands.items():
            text = sub.format_help()
            assert "hunter2" not in text, f"modstream {name} --help prints the Redis password"
        serve = commands["review"]._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
        assert "(default: 300.0)" in " ".join(serve.split()) and "hunter2" not in serve
    finally:
        settings.current.cache_clear()


def test_serve_media_serves_a_folder_on_loopback_until_terminated(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from PIL import Image

    from tests.integration.stack import REPO_ROOT, free_loopback_ports

    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    (port,) = free_loopback_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "modstream.cli", "serve-media", "--root", str(tmp_path), "--port", str(port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/img" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/img/x.png", timeout=10) as resp:
            assert resp.status == 200 and resp.read().startswith(b"\x89PNG")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/img/..%2F..%2Fetc%2Fpasswd", timeout=10)
            raise AssertionError("a path outside the folder was served")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    assert proc.returncode == 0
    missing = subprocess.run(
        [sys.executable, "-m", "modstream.cli", "serve-media", "--root", str(tmp_path / "nope")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_the_documented_loop_by_hand_parses_command_by_command():
    """docs/review.md's "whole loop by hand" is what a newcomer types: every modstream command
    in it must parse with today's options (the roles themselves run the same loop in
    tests/integration/test_retrain_rounds.py), and produce's media URL must be where
    serve-media serves by default."""
    import re
    import shlex
    from pathlib import Path

    from modstream.cli import build_parser

    doc = (Path(__file__).resolve().parents[2] / "docs" / "review.md").read_text()
    block = doc.split("**The whole loop by hand**", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if "modstream" not in line:
            continue
        command = line.split("|")[-1].strip()
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/modstream", line
        commands.append(argv[1:])
    names = [argv[0] for argv in commands]
    for needed in ("demo", "worker", "review-sink", "dataset-sink", "review", "serve-media", "produce", "labels"):
        assert needed in names, f"the loop by hand lacks `modstream {needed}`"
    assert "retrain" in names
    parser = build_parser()
    parsed = {}
    for argv in commands:
        parsed.setdefault(argv[0], parser.parse_args(argv))
    media = parsed["serve-media"]
    produce = parsed["produce"]
    assert re.fullmatch(rf"http://127\.0\.0\.1:{media.port}/img", produce.media_url), (media, produce.media_url)
