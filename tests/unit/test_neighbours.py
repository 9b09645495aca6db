"""The labelled-neighbour index (models/neighbours.py) and the routing term that reads it."""

import math

import numpy as np
import pytest

from models.losses import IGNORE_INDEX
from models.neighbours import NeighbourIndex, disagreement
from models.routing.policy import NEIGHBOURS_DISAGREE, PolicyInputs, RoutingPolicySpec, uncertainty

TEXT_DIM = 4


def _posts(rng: np.random.Generator, centres: np.ndarray, per: int, noise: float = 0.05) -> np.ndarray:
    """`per` noisy copies of each centre row (text and image columns alike)."""
    return np.concatenate([c + noise * rng.standard_normal((per, centres.shape[1])) for c in centres])


def _index(k: int = 3, **kwargs) -> tuple[NeighbourIndex, np.ndarray]:
    """Two clusters, 5 posts each: cluster A labelled hate 0, cluster B hate 1."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, TEXT_DIM + 3)) * 3
    x = _posts(rng, centres, 5)
    hate = np.array([0] * 5 + [1] * 5)
    index = NeighbourIndex.build(x, np.ones(10, bool), {"hate": hate}, {"hate": 2}, TEXT_DIM, k=k, **kwargs)
    return index, centres


def test_a_post_inside_a_cluster_gets_that_clusters_label_share():
    index, centres = _index()
    shares = index.label_shares(centres, np.ones(2, bool))
    for space in ("text", "image"):
        np.testing.assert_allclose(shares[space]["hate"], [[1, 0], [0, 1]], atol=1e-6)
    # The model saying "hate" (1) on cluster A's post disagrees with every neighbour; "0" with none.
    d = disagreement(shares, {"hate": np.array([1, 1])})
    np.testing.assert_allclose(d["hate"], [1.0, 0.0], atol=1e-6)


def test_only_the_k_nearest_labelled_posts_vote_and_unlabelled_posts_never_do():
    rng = np.random.default_rng(1)
    # Posts labelled for sarcasm only: in the index (a sane standardisation) but no hate votes.
    background = 3 * rng.standard_normal((30, TEXT_DIM + 3))
    query = background[0]
    near, further = rng.standard_normal((2, TEXT_DIM + 3))
    # Two unlabelled posts on the query, three labelled 1 close by, three labelled 0 further off.
    x = np.vstack([background, [query] * 2, [query + 0.2 * near] * 3, [query + 1.0 * further] * 3])
    hate = np.array([IGNORE_INDEX] * 32 + [1] * 3 + [0] * 3)
    labels = {"hate": hate, "sarcasm": np.where(hate == IGNORE_INDEX, 1, IGNORE_INDEX)}

    def share_of_0(k: int) -> float:
        index = NeighbourIndex.build(x, np.ones(len(x), bool), labels, {"hate": 2, "sarcasm": 2}, TEXT_DIM, k=k)
        return float(index.label_shares(query[None], np.ones(1, bool))["text"]["hate"][0, 0])

    # k = 3: the three labelled-1 posts; had the unlabelled ones taken two of the k places, k = 4
    # would still reach no labelled-0 post.
    assert share_of_0(3) == pytest.approx(0.0, abs=1e-6)
    assert share_of_0(4) > 0.1


def test_a_text_only_post_is_judged_by_its_text_neighbours_alone():
    index, centres = _index()
    # Text of cluster A, image of cluster B: with the image absent only the text votes.
    query = np.concatenate([centres[0, :TEXT_DIM], centres[1, TEXT_DIM:]])[None]
    shares = index.label_shares(query, np.array([False]))
    assert np.isnan(shares["image"]["hate"]).all()
    assert disagreement(shares, {"hate": np.array([1])})["hate"][0] == pytest.approx(1.0)
    # With the image present, the two spaces disagree with each other and average out.
    both = index.label_shares(query, np.array([True]))
    assert disagreement(both, {"hate": np.array([1])})["hate"][0] == pytest.approx(0.5, abs=1e-6)


def test_training_posts_without_an_image_stay_out_of_the_image_space():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, TEXT_DIM + 3))
    present = np.array([True, False, True, False, True, True])
    index = NeighbourIndex.build(x, present, {"hate": np.array([0, 1, 0, 1, 0, 1])}, {"hate": 2}, TEXT_DIM)
    assert len(index.spaces["text"].vectors) == 6 and len(index.spaces["image"].vectors) == 4
    assert index.spaces["image"].labels["hate"].tolist() == [0, 0, 0, 1]


def test_no_neighbours_at_all_gives_nan_not_agreement():
    assert math.isnan(disagreement({}, {"hate": np.array([1])})["hate"][0])


def test_a_large_training_set_is_sampled_to_max_rows():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, TEXT_DIM + 3))
    y = rng.integers(0, 2, 50)
    index = NeighbourIndex.build(x, np.ones(50, bool), {"hate": y}, {"hate": 2}, TEXT_DIM, max_rows=20)
    assert len(index) == 20 and len(index.spaces["image"].labels["hate"]) == 20


def test_the_index_survives_its_storage_format():
    index, centres = _index()
    arrays, meta = index.to_arrays()
    again = NeighbourIndex.from_arrays(arrays, meta)
    a, b = index.label_shares(centres, np.ones(2, bool)), again.label_shares(centres, np.ones(2, bool))
    np.testing.assert_allclose(a["text"]["hate"], b["text"]["hate"], atol=1e-3)
    assert again.k == index.k and again.n_labels == {"hate": 2}
    broken = {k: v for k, v in arrays.items() if k != "text/labels/hate"}
    with pytest.raises(ValueError, match="malformed neighbour index"):
        NeighbourIndex.from_arrays(broken, meta)


def test_bad_build_inputs_are_refused():
    with pytest.raises(ValueError, match="text_dim"):
        NeighbourIndex.build(np.zeros((3, 4)), np.ones(3, bool), {"hate": np.zeros(3)}, {"hate": 2}, text_dim=4)
    with pytest.raises(ValueError, match="k must be"):
        NeighbourIndex.build(np.zeros((3, 6)), np.ones(3, bool), {"hate": np.zeros(3)}, {"hate": 2}, 4, k=0)


# ---------------------------------------------------------------- the routing term


def _inputs(p_hate, disagree):
    return PolicyInputs(
        scores={"hate": np.array(p_hate, float)},
        thresholds={"hate": 0.5},
        itm=np.full(len(p_hate), math.nan),
        disagreement={"hate": np.array(disagree, float)},
    )


def test_disagreeing_neighbours_raise_a_confident_posts_score():
    spec = RoutingPolicySpec(kind="uncertainty", neighbour_weight=2.0, neighbour_fill=0.25)
    x = _inputs([0.99, 0.99, 0.6, 0.99], [0.0, 1.0, 0.0, math.nan])
    base = uncertainty("margin").scores(x)
    np.testing.assert_allclose(spec.scores(x), base + np.array([0.0, 2.0, 0.0, 0.5]))
    # A confident post whose neighbours all disagree outranks an uncertain one they agree with.
    assert spec.scores(x)[1] > spec.scores(x)[2]
    assert spec.reasons(_inputs([0.99], [1.0])) == [f"{NEIGHBOURS_DISAGREE}_hate", "uncertain_hate"]
    assert spec.reasons(_inputs([0.55], [0.9])) == [f"{NEIGHBOURS_DISAGREE}_hate", "uncertain_hate"]
    assert spec.reasons(_inputs([0.5], [0.1])) == ["uncertain_hate"]


def test_a_label_without_disagreement_counts_as_the_fill():
    spec = RoutingPolicySpec(kind="uncertainty", neighbour_weight=1.0, neighbour_fill=0.3)
    one = PolicyInputs.one(None, {"hate": (0.9, 0.5)})  # e.g. a label cached before the index existed
    assert spec.scores(one)[0] == pytest.approx(uncertainty("margin").scores(one)[0] + 0.3)
    assert spec.score_post(None, {"hate": (0.9, 0.5)}, {"hate": 0.8}) == pytest.approx(
        uncertainty("margin").scores(one)[0] + 0.8
    )


def test_the_neighbour_weight_survives_the_card_and_is_validated():
    spec = RoutingPolicySpec(kind="uncertainty", task_combine="sum", neighbour_weight=2.0, neighbour_fill=0.4)
    again = RoutingPolicySpec.from_dict(spec.to_dict())
    assert (again.neighbour_weight, again.neighbour_fill, again.task_combine) == (2.0, 0.4, "sum")
    assert RoutingPolicySpec.from_dict(uncertainty().to_dict()).neighbour_weight == 0.0
    with pytest.raises(ValueError, match="neighbour_weight"):
        RoutingPolicySpec(kind="uncertainty", neighbour_weight=-1.0)


# ---------------------------------------------------------------- the vote


def test_the_vote_mixes_the_neighbour_shares_into_the_probabilities():
    import torch

    index, centres = _index()
    logits = {"hate": torch.tensor([[2.0, -1.0], [0.3, 0.1]])}
    pooled = torch.as_tensor(centres, dtype=torch.float32)
    voted = index.vote(logits, index.label_shares_tensors(pooled, torch.tensor([True, False])), 0.25)
    shares = index.label_shares(centres, np.array([True, False]))
    # Post 0 has both spaces (averaged), post 1 only text (no image).
    vote = np.stack([(shares["text"]["hate"][0] + shares["image"]["hate"][0]) / 2, shares["text"]["hate"][1]])
    expected = np.log(0.75 * torch.softmax(logits["hate"], -1).numpy() + 0.25 * vote)
    np.testing.assert_allclose(voted["hate"].numpy(), expected, atol=1e-5)
    # A task the index does not know keeps its logits.
    other = {"toxicity": torch.tensor([[1.0, 2.0], [0.0, 0.0]])}
    assert torch.equal(
        index.vote(other, index.label_shares_tensors(pooled, torch.tensor([True, True])), 0.5)["toxicity"],
        other["toxicity"],
    )


def test_neighbour_vote_must_be_a_weight_below_one():
    from models.config import ModelConfig

    with pytest.raises(ValueError, match="neighbour_vote"):
        ModelConfig(neighbour_vote=1.0)
    with pytest.raises(ValueError, match="neighbour_vote"):
        ModelConfig(neighbour_vote=-0.1)
