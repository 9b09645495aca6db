import json

from models.card import ModelCard
from models.registry import ModelRegistry
from stream.cli import main
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


def test_classify_command_labels_every_line_and_rejects_bad_ones(tmp_path, synthetic_small, capsys):
    model, tok = tiny_model()
    registry = tmp_path / "registry"
    card = ModelCard(
        config=model.config, itm={"trained": True, "auroc": 0.9, "routing_lift": {"hate": 2.0}, "threshold": 0.99}
    )
    ModelRegistry(registry).save(model, tok, card)
    image = synthetic_small[0].image
    broken = tmp_path / "broken.png"
    broken.write_bytes(image.read_bytes()[:60])
    posts = tmp_path / "posts.jsonl"
    posts.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "text": "lovely day", "image": str(image)}),
                json.dumps({"id": "b", "text": "text only", "image": None}),
                json.dumps({"id": "c", "text": "broken", "image": "broken.png"}),
                "{not json",
                json.dumps({"id": 5, "text": "bad id"}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "labels.jsonl"
    assert main(["classify", str(posts), "--registry", str(registry), "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5
    by_id = {r["post_id"]: r for r in records if "post_id" in r}
    assert by_id["a"]["model_version"] == "v0001" and by_id["a"]["media_status"] == "ok"
    assert by_id["a"]["route"] == "review" and by_id["a"]["reasons"] == ["weak_image_text_match"]  # threshold 0.99
    assert by_id["b"]["itm_match"] is None and by_id["b"]["route"] == "auto"
    assert by_id["c"]["media_status"] in {"truncated", "corrupt"} and by_id["c"]["itm_match"] is None
    assert sorted(r["error"] for r in records if "error" in r) == ["invalid_json", "invalid_post"]
    assert main(["models", "--registry", str(registry)]) == 0
    assert "* v0001" in capsys.readouterr().out
