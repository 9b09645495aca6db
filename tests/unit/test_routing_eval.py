import functools
import json
import math

import numpy as np
import pytest

from models.card import ModelCard
from models.routing.policy import PolicyInputs, RoutingPolicySpec
from studies.routing_eval import (
    SHIPPED_ROW,
    FoldOutputs,
    catch_stats,
    compare,
    fit_combined,
    policy_inputs,
    routing_block,
    run_folds,
    run_splits,
    saved_runs,
)
from tests.tiny import tiny_config, tiny_model
from trainer.calibration import Calibration
from trainer.routing_fit import CHOSEN_POLICY, FALLBACK_POLICY, NEIGHBOUR_WEIGHT
from trainer.train import EvalOutput, TrainConfig


def _split(n: int, seed: int) -> EvalOutput:
    """A model whose hate errors sit where the ITM match is weak, and whose sarcasm errors
    sit near its threshold: each signal should be found by the policy that reads it."""
    rng = np.random.default_rng(seed)
    itm = rng.uniform(0, 1, n)
    itm[: n // 10] = np.nan  # text-only posts
    p_hate = rng.uniform(0.05, 0.95, n)
    y_hate = (p_hate >= 0.5).astype(np.int64)
    wrong_hate = np.nan_to_num(itm, nan=0.5) < 0.15
    y_hate[wrong_hate] = 1 - y_hate[wrong_hate]
    p_sarc = rng.uniform(0.05, 0.95, n)
    y_sarc = (p_sarc >= 0.5).astype(np.int64)
    near = np.abs(p_sarc - 0.5) < 0.08
    y_sarc[near] = rng.integers(0, 2, near.sum())
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    return EvalOutput(
        logits={t: np.stack([np.zeros(n), logit(p)], 1) for t, p in (("hate", p_hate), ("sarcasm", p_sarc))},
        labels={"hate": y_hate, "sarcasm": y_sarc},
        itm_match=itm,
        itm_swapped=np.full(n, np.nan),
    )


CAL = Calibration(temperatures={"hate": 1.0, "sarcasm": 1.0}, thresholds={"hate": 0.5, "sarcasm": 0.5})


def _runs(k: int = 3) -> list[FoldOutputs]:
    return [FoldOutputs(f, 0, _split(600, 10 * f), _split(600, 10 * f + 1), CAL, np.arange(600)) for f in range(k)]


def test_catch_stats_counts_recall_precision_and_lift():
    reviewed = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    errors = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    s = catch_stats(reviewed, errors)
    assert (s["recall"], s["precision"], s["reviewed_share"]) == (0.5, 0.5, 0.2)
    assert s["lift"] == pytest.approx(2.5)
    assert math.isnan(catch_stats(reviewed, np.zeros(10, bool))["lift"])


def test_policy_inputs_mark_errors_from_calibrated_decisions():
    ev = _split(200, 0)
    x, truth = policy_inputs(ev, CAL, ["hate", "sarcasm"])
    expected = (x.scores["hate"] >= 0.5).astype(int) != ev.labels["hate"]
    assert np.array_equal(truth["errors"]["hate"], expected)
    assert np.isnan(x.itm).sum() == 20


def test_comparison_finds_each_signal_and_random_stays_near_one():
    result = compare(_runs(), ["hate", "sarcasm"], n_boot=100)["table"]
    at10 = {name: result[name]["0.1"] for name in result}
    # Hate errors are exactly the weak-match posts: ITM catches them, uncertainty does not.
    assert at10["ITM only"]["hate"]["lift"] > 3 > at10["uncertainty (margin)"]["hate"]["lift"]
    # Sarcasm errors sit at the threshold: uncertainty catches them, ITM does not.
    assert at10["uncertainty (margin)"]["sarcasm"]["lift"] > 2 > at10["ITM only"]["sarcasm"]["lift"]
    # The fitted combination gets both.
    combined = at10["combined (logistic)"]
    assert combined["hate"]["lift"] > 2 and combined["sarcasm"]["lift"] > 1.5
    assert 0.6 < at10["random"]["hate"]["lift"] < 1.4
    lo, hi = combined["hate"]["ci"]["lift"]
    assert lo <= combined["hate"]["lift"] <= hi
    assert len(combined["hate"]["lift_per_run"]) == 3
    # The cut set on validation reviews about the budget on the test folds.
    for budget in ("0.05", "0.1", "0.2"):
        assert result["combined (logistic)"][budget]["hate"]["reviewed_share"] == pytest.approx(float(budget), abs=0.03)


def test_fitted_combination_learns_the_weak_match_signal():
    ev = _split(2000, 3)
    x, truth = policy_inputs(ev, CAL, ["hate", "sarcasm"])
    spec = fit_combined(x, truth["errors"], truth["labelled"])
    assert spec.heads["hate"].coef[spec.features.index("itm")] < 0  # weaker match, likelier error
    assert spec.heads["sarcasm"].coef[spec.features.index("margin_sarcasm")] > 0


def test_routing_block_is_a_card_policy_the_worker_can_load():
    ev = _split(400, 5)
    block = routing_block(ev, CAL, ["hate", "sarcasm"], budget=0.1)
    card = ModelCard.from_dict({**ModelCard(config=tiny_config()).to_dict(), "routing": block})
    spec = card.routing_policy()
    assert isinstance(spec, RoutingPolicySpec) and spec.budget == 0.1
    x, _ = policy_inputs(ev, CAL, ["hate", "sarcasm"])
    assert spec.review(x).mean() == pytest.approx(0.1, abs=0.01)
    assert set(block["curve"]) >= {"0.05", "0.1", "0.2"} and "lift" in block["curve"]["0.1"]["hate"]
    one = PolicyInputs.one(None, {"hate": (0.5, 0.5), "sarcasm": (0.9, 0.5)})
    assert np.isfinite(spec.scores(one)).all()  # text-only posts get a score


def test_run_folds_trains_once_and_resumes(tmp_path, synthetic_small, monkeypatch):
    cfg = tiny_config()
    train_cfg = TrainConfig(epochs=1, itm_finish_epochs=1)
    runs = run_folds(synthetic_small, tmp_path, folds=2, train_config=train_cfg, model_and_tokenizer=tiny_model(cfg))
    assert [(r.fold, r.seed) for r in runs] == [(0, 0), (1, 0)]
    assert sorted(np.concatenate([r.test_idx for r in runs]).tolist()) == list(range(len(synthetic_small)))
    assert set(runs[0].test.logits) == {"hate", "sarcasm"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr("studies.routing_eval.train", no_training)
    again = run_folds(synthetic_small, tmp_path, folds=2, train_config=train_cfg, model_and_tokenizer=tiny_model(cfg))
    np.testing.assert_array_equal(again[1].test.logits["hate"], runs[1].test.logits["hate"])
    assert again[0].calibration.thresholds == runs[0].calibration.thresholds

    # Scoring what a cut-short grid saved: the runs asked for, nothing trained, a missing one refused.
    kwargs = dict(folds=2, train_config=train_cfg, model_config=cfg)
    (only,) = saved_runs(synthetic_small, tmp_path, units=[(1, 0)], **kwargs)
    np.testing.assert_array_equal(only.test.logits["hate"], runs[1].test.logits["hate"])
    assert [(r.fold, r.seed) for r in saved_runs(synthetic_small, tmp_path, **kwargs)] == [(0, 0), (1, 0)]
    with pytest.raises(ValueError, match=r"no saved run for \(fold, seed\) \[\(1, 1\)\]"):
        saved_runs(synthetic_small, tmp_path, units=[(1, 1)], **kwargs)
    with pytest.raises(ValueError, match="another"):  # saved under another configuration
        saved_runs(synthetic_small, tmp_path, through_fit=True, **kwargs)


def test_run_splits_partition_each_fold_and_vary_validation_by_seed(synthetic_small):
    tasks = tiny_config().tasks
    splits = run_splits(synthetic_small, tasks, 3, (0, 1), 0.2)
    assert sorted(splits) == [(f, s) for f in range(3) for s in (0, 1)]
    tests = []
    for (fold, seed), (train, val, test) in splits.items():
        assert sorted(train + val + test) == list(range(len(synthetic_small)))  # disjoint, all posts
        assert abs(len(val) - 0.2 * (len(train) + len(val))) <= len(tasks) * 4  # stratified rounding
        if seed == 0:
            tests += test
            assert splits[(fold, 1)][2] == test  # the seed moves validation, never the test fold
            assert splits[(fold, 1)][1] != val
    assert sorted(tests) == list(range(len(synthetic_small)))


def test_runs_through_fit_score_the_served_model_and_measure_its_card_policy(tmp_path, synthetic_small, monkeypatch):
    cfg = tiny_config()
    train_cfg = TrainConfig(epochs=1, itm_finish_epochs=1)
    kwargs = dict(folds=2, train_config=train_cfg, through_fit=True)
    # 12 validation posts per fold hold fewer errors than a card policy needs (MIN_ERRORS).
    monkeypatch.setattr("trainer.fit.routing_block", functools.partial(routing_block, min_errors=1))
    runs = run_folds(synthetic_small, tmp_path, model_and_tokenizer=tiny_model(cfg), **kwargs)
    splits = run_splits(synthetic_small, cfg.tasks, 2, (0,), 0.15)
    for run in runs:
        _, val, test = splits[(run.fold, 0)]
        assert run.test_idx.tolist() == test
        hate = np.array([1 if ex.labels.get("hate") == "hateful" else 0 for ex in synthetic_small])
        np.testing.assert_array_equal(run.val.labels["hate"], hate[val])  # fit() drew run_splits' validation
        assert run.shares["test"]["text"]["hate"].shape == (len(test), 2)
        # Served by the head + probe blend: log of a mean of probabilities, so each row's
        # probabilities sum to 1 before temperature (a head's raw logits do not).
        np.testing.assert_allclose(np.exp(run.test.logits["hate"]).sum(1), 1.0, atol=1e-4)
        assert run.card_policy and run.card_policy["budget"] == 0.1
    result = compare(runs, list(cfg.tasks), n_boot=20)
    shipped_row = result["table"][SHIPPED_ROW]
    assert list(shipped_row) == ["0.1"]  # only at the budget the card's cut was set for
    assert shipped_row["0.1"]["hate"]["n_errors"] > 0

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished run was refitted")

    monkeypatch.setattr("studies.routing_eval.fit_features", no_fit)
    again = run_folds(synthetic_small, tmp_path, model_and_tokenizer=tiny_model(cfg), **kwargs)
    assert again[1].card_policy == runs[1].card_policy
    with pytest.raises(ValueError, match="another"):  # head-only runs never mix with served ones
        run_folds(synthetic_small, tmp_path, folds=2, train_config=train_cfg, model_and_tokenizer=tiny_model(cfg))


def test_runs_through_fit_fine_tune_a_fresh_text_encoder_each_run(tmp_path, synthetic_small, monkeypatch):
    import dataclasses

    import torch

    import studies.routing_eval as routing_eval

    base, tokenizer = tiny_model(dataclasses.replace(tiny_config(), text_trainable_layers=-1))
    pretrained = {k: v.clone() for k, v in base.text_encoder.state_dict().items()}
    trained, original = [], routing_eval.run_model

    def recording_run_model(model, config):
        run = original(model, config)
        trained.append(run)
        return run

    monkeypatch.setattr("trainer.fit.routing_block", functools.partial(routing_block, min_errors=1))
    monkeypatch.setattr(routing_eval, "run_model", recording_run_model)
    runs = run_folds(
        synthetic_small,
        tmp_path,
        folds=2,
        train_config=TrainConfig(epochs=1, itm_finish_epochs=0),
        model_and_tokenizer=(base, tokenizer),
        through_fit=True,
    )
    assert len(runs) == len(trained) == 2
    for name, value in base.text_encoder.state_dict().items():  # each run started from the pretrained encoder
        torch.testing.assert_close(value, pretrained[name])
    for run in trained:  # ... and fine-tuned its own copy
        assert run.text_encoder is not base.text_encoder
        assert run.image_encoder is base.image_encoder  # the frozen one stays shared
        moved = [not torch.equal(v, pretrained[k]) for k, v in run.text_encoder.state_dict().items()]
        assert sum(moved) > len(moved) // 2
    assert json.loads((tmp_path / "config.json").read_text())["model"]["text_trainable_layers"] == -1


def test_itm_weight_is_fitted_only_where_weak_matches_hold_errors():
    from studies.routing_eval import fit_itm_weight

    ev = _split(1500, 4)  # hate errors are the weak-match posts
    x, truth = policy_inputs(ev, CAL, ["hate", "sarcasm"])
    assert fit_itm_weight(x, truth["errors"], truth["labelled"], 0.1).itm_weight > 0
    # Errors only at the thresholds and an ITM of pure noise: the margin alone is best, w stays 0.
    rng = np.random.default_rng(1)
    scores = {t: rng.uniform(0.05, 0.95, 1500) for t in ("hate", "sarcasm")}
    errors = {t: (np.abs(p - 0.5) < 0.1) & (rng.random(1500) < 0.6) for t, p in scores.items()}
    noise = PolicyInputs(scores, {"hate": 0.5, "sarcasm": 0.5}, rng.uniform(0, 1, 1500))
    everyone = {t: np.ones(1500, bool) for t in scores}
    assert fit_itm_weight(noise, errors, everyone, 0.1).itm_weight == 0


def test_routing_block_leaves_out_a_task_without_validation_labels():
    ev = _split(300, 6)
    ev.labels["sarcasm"][:] = -100  # a dataset that labels only hate
    block = routing_block(ev, CAL, ["hate", "sarcasm"])
    assert block["tasks"] == ["hate"] and set(block["curve"]["0.1"]) == {"hate"}
    ev.labels["hate"][:] = -100
    assert routing_block(ev, CAL, ["hate", "sarcasm"]) == {}


def test_runs_made_under_another_config_are_refused(tmp_path, synthetic_small):
    from studies.routing_eval import check_runs_dir, runs_config

    cfg = tiny_config()
    config = runs_config(synthetic_small, TrainConfig(epochs=1), cfg, 2, 0.15)
    check_runs_dir(tmp_path / "a", config)  # writes config.json
    check_runs_dir(tmp_path / "a", runs_config(synthetic_small, TrainConfig(epochs=1, seed=3), cfg, 2, 0.15))
    with pytest.raises(ValueError, match="another train"):
        check_runs_dir(tmp_path / "a", runs_config(synthetic_small, TrainConfig(epochs=2), cfg, 2, 0.15))
    with pytest.raises(ValueError, match="another data"):
        check_runs_dir(tmp_path / "a", runs_config(synthetic_small[:-1], TrainConfig(epochs=1), cfg, 2, 0.15))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fold0-seed0.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown configuration"):
        check_runs_dir(tmp_path / "b", config)


def test_a_model_without_validation_errors_ships_no_policy_and_keeps_the_itm_gate():
    # Synthetic data: the model is right on every validation post, so every uncertainty is
    # about 0 and a quantile cut would route every live post; the card must fall back.
    ev = _split(300, 7)
    for task, logits in ev.logits.items():
        p = (ev.labels[task] == 1).astype(float) * 0.998 + 0.001
        logits[:, 1] = np.log(p / (1 - p))
    assert routing_block(ev, CAL, ["hate", "sarcasm"]) == {}
    ev.labels["hate"][:25] = 1 - ev.labels["hate"][:25]  # 25 errors: enough evidence for a policy
    assert routing_block(ev, CAL, ["hate", "sarcasm"])["kind"] == "uncertainty"


# ---------------------------------------------------------------- labelled neighbours


def _with_neighbours(ev: EvalOutput, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Neighbour label shares for `ev`'s posts where hate's confident mistakes are known to
    the neighbours (they hold the true label) and every other post's neighbours are a coin
    flip around the model's own decision: only the neighbour term can find those mistakes."""
    rng = np.random.default_rng(seed)
    shares: dict[str, dict[str, np.ndarray]] = {"text": {}, "image": {}}
    for task, logits in ev.logits.items():
        decided = (1 / (1 + np.exp(-logits[:, 1])) >= 0.5).astype(int)
        wrong = decided != ev.labels[task]
        for space in shares:
            agree = rng.uniform(0.5, 1.0, len(decided))
            agree[wrong & (task == "hate")] = rng.uniform(0.0, 0.2, int((wrong & (task == "hate")).sum()))
            p1 = np.where(decided == 1, agree, 1 - agree)
            shares[space][task] = np.stack([1 - p1, p1], 1)
    return shares


def test_neighbour_policy_catches_confident_mistakes_the_neighbours_know():
    runs = _runs()
    for r, run in enumerate(runs):
        run.shares = {"val": _with_neighbours(run.val, 100 + r), "test": _with_neighbours(run.test, 200 + r)}
    at10 = {name: by["0.1"] for name, by in compare(runs, ["hate", "sarcasm"], n_boot=50)["table"].items()}
    # Hate's errors are weak-match posts at every confidence: margin cannot see them, neighbours can.
    assert at10["uncertainty + neighbours (summed over tasks)"]["hate"]["lift"] > 2.5
    assert at10["uncertainty (margin)"]["hate"]["lift"] < 1.5
    # Without neighbour shares the neighbour policies are not offered at all.
    assert "uncertainty + neighbours" not in compare(_runs(1), ["hate", "sarcasm"], n_boot=10)["table"]


def test_routing_block_ships_the_neighbour_policy_only_with_neighbours():
    ev = _split(400, 5)
    block = routing_block(ev, CAL, ["hate", "sarcasm"], neighbours=_with_neighbours(ev, 1))
    assert block["name"] == CHOSEN_POLICY and block["neighbour_weight"] == NEIGHBOUR_WEIGHT
    assert block["task_combine"] == "sum" and 0 <= block["neighbour_fill"] <= 1
    x, _ = policy_inputs(ev, CAL, ["hate", "sarcasm"], _with_neighbours(ev, 1))
    assert RoutingPolicySpec.from_dict(block).review(x).mean() == pytest.approx(0.1, abs=0.01)
    plain = routing_block(ev, CAL, ["hate", "sarcasm"])
    assert plain["name"] == FALLBACK_POLICY and "neighbour_weight" not in plain


def test_policy_inputs_measure_disagreement_with_the_calibrated_decision():
    ev = _split(50, 2)
    shares = _with_neighbours(ev, 3)
    x, _ = policy_inputs(ev, CAL, ["hate"], shares)
    decided = (x.scores["hate"] >= 0.5).astype(int)
    rows = np.arange(50)
    expected = np.mean([1 - shares[s]["hate"][rows, decided] for s in ("text", "image")], axis=0)
    np.testing.assert_allclose(x.disagreement["hate"], expected)


def test_runs_saved_without_neighbour_shares_get_them_without_retraining(tmp_path, synthetic_small, monkeypatch):
    cfg = tiny_config()
    train_cfg = TrainConfig(epochs=1, itm_finish_epochs=1)
    runs = run_folds(synthetic_small, tmp_path, folds=2, train_config=train_cfg, model_and_tokenizer=tiny_model(cfg))
    assert set(runs[0].shares) == {"val", "test"} and runs[0].shares["test"]["text"]["hate"].shape[1] == 2
    assert len(runs[0].shares["test"]["text"]["hate"]) == len(runs[0].test_idx)
    for path in tmp_path.glob("fold*.npz"):  # as saved before neighbour policies existed
        with np.load(path) as data:
            kept = {k: data[k] for k in data.files if "/shares/" not in k}
        np.savez(path, **kept)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr("studies.routing_eval.train", no_training)
    again = run_folds(synthetic_small, tmp_path, folds=2, train_config=train_cfg, model_and_tokenizer=tiny_model(cfg))
    np.testing.assert_allclose(again[1].shares["val"]["image"]["sarcasm"], runs[1].shares["val"]["image"]["sarcasm"])
