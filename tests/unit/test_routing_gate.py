"""The ITM routing gate decides from evidence: a lift from a handful of errors is not a lift of 0."""

from models.routing.gate import GateFloors, decide_itm_routing

BASE = {"trained": True, "threshold": 0.3, "auroc": 0.85, "auroc_ci": [0.8, 0.9]}


def _itm(**evidence):
    return {**BASE, "routing_evidence": evidence}


def test_a_lift_from_too_few_errors_does_not_switch_routing_off():
    # The synthetic model of `make run`: one validation error, not in the lowest-ITM tenth.
    enabled, why = decide_itm_routing(_itm(hate={"lift": 0.0, "lift_ci": [0.0, 0.0], "n_errors": 1}))
    assert enabled
    assert "not enough evidence" in why and "hate: 1 errors" in why and "needs 20" in why


def test_enough_errors_with_the_whole_interval_below_the_floor_switches_it_off():
    enabled, why = decide_itm_routing(_itm(hate={"lift": 0.7, "lift_ci": [0.4, 0.95], "n_errors": 40}))
    assert not enabled and "hate lift 0.70 [0.40, 0.95] from 40 errors" in why


def test_an_interval_reaching_the_floor_is_not_evidence_against():
    enabled, why = decide_itm_routing(_itm(hate={"lift": 0.9, "lift_ci": [0.5, 1.3], "n_errors": 40}))
    assert enabled and "hate lift 0.90" in why


def test_one_task_with_a_real_lift_keeps_routing_on():
    evidence = {
        "hate": {"lift": 1.6, "lift_ci": [1.2, 2.0], "n_errors": 50},
        "sarcasm": {"lift": 0.5, "lift_ci": [0.2, 0.8], "n_errors": 50},
    }
    enabled, why = decide_itm_routing(_itm(**evidence))
    assert enabled and "routing hate lift 1.60" in why and "but sarcasm lift 0.50" in why


def test_auroc_below_the_floor_or_untrained_or_no_threshold_is_off():
    assert not decide_itm_routing({**BASE, "auroc": 0.55})[0]
    assert "0.55 [0.80, 0.90]" in decide_itm_routing({**BASE, "auroc": 0.55})[1]
    assert not decide_itm_routing({**BASE, "trained": False})[0]
    assert not decide_itm_routing({**BASE, "threshold": None})[0]
    assert not decide_itm_routing({**BASE, "auroc": float("nan")})[0]


def test_floors_are_the_callers():
    itm = _itm(hate={"lift": 1.1, "lift_ci": [1.02, 1.2], "n_errors": 30})
    assert decide_itm_routing(itm)[0]
    assert not decide_itm_routing(itm, GateFloors(min_lift=1.5))[0]
    assert decide_itm_routing(itm, GateFloors(min_lift=1.5, min_errors=31))[0]  # 30 errors: too few now


def test_older_cards_without_evidence_sizes_are_judged_on_auroc():
    enabled, why = decide_itm_routing({**BASE, "routing_lift": {"hate": 0.0}})
    assert enabled and "of unknown size" in why
