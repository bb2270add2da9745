"""Sampler: greedy, masks, penalties and seeds, checked against direct computations."""

import math

import pytest
import torch

from krasisd.engine.options import SamplingOptions
from krasisd.engine.sampling import Sampler

NEUTRAL = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def opts(**kw):
    return SamplingOptions(**{**NEUTRAL, **kw})


def random_logits(seed=0, vocab_size=50):
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed)) * 3  # [V]


def draw_counts(sampler, logits, draws=4000, history=()):
    counts = torch.zeros(logits.numel())
    for _ in range(draws):
        token_id, _ = sampler.sample(logits, list(history))
        counts[token_id] += 1
    return counts / draws


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax_and_logprob_is_log_softmax(seed):
    logits = random_logits(seed)
    token_id, logprob = Sampler(opts(temperature=0)).sample(logits, [])
    assert token_id == int(logits.argmax())
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token_id]), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_greedy_at_any_temperature(seed):
    logits = random_logits(seed)
    sampler = Sampler(opts(temperature=1.5, top_k=1, seed=seed))
    for _ in range(20):
        token_id, logprob = sampler.sample(logits, [])
        assert token_id == int(logits.argmax()) and logprob == pytest.approx(0.0, abs=1e-6)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = random_logits(3)

    def run(seed):
        sampler = Sampler(opts(temperature=1.0, seed=seed))
        return [sampler.sample(logits, [])[0] for _ in range(40)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_one_draws_follow_softmax():
    logits = random_logits(4, vocab_size=8)
    freq = draw_counts(Sampler(opts(temperature=1.0, seed=0)), logits, draws=6000)
    assert torch.allclose(freq, torch.softmax(logits, -1), atol=0.03)


def test_logprob_is_under_the_tempered_masked_distribution():
    logits = random_logits(5)
    sampler = Sampler(opts(temperature=0.7, top_k=5, seed=1))
    top_values, top_ids = torch.topk(logits, 5)
    expected = dict(zip(top_ids.tolist(), torch.log_softmax(top_values / 0.7, -1).tolist(),
                        strict=True))
    for _ in range(30):
        token_id, logprob = sampler.sample(logits, [])
        assert logprob == pytest.approx(expected[token_id], abs=1e-5)


def test_top_k_keeps_only_the_k_best():
    logits = random_logits(6)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    freq = draw_counts(Sampler(opts(temperature=5.0, top_k=3, seed=2)), logits, draws=600)
    assert set(torch.nonzero(freq).flatten().tolist()) == allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # [V]
    freq = draw_counts(Sampler(opts(temperature=1.0, top_p=0.75, seed=3)), logits, draws=2000)
    # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the first two stay, renormalized to 5/8 and 3/8
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0] == pytest.approx(0.625, abs=0.04)


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))  # [V]
    freq = draw_counts(Sampler(opts(temperature=1.0, min_p=0.3, seed=4)), logits, draws=2000)
    # threshold 0.3 * 0.4 = 0.12: tokens 3 and 4 are dropped
    assert freq[3] == 0 and freq[4] == 0 and freq[2] > 0


def test_top_p_and_min_p_always_keep_the_best_token():
    logits = torch.tensor([10.0, 0.0, 0.0])  # [V]
    sampler = Sampler(opts(temperature=1.0, top_p=0.01, min_p=0.99, seed=0))
    assert {sampler.sample(logits, [])[0] for _ in range(20)} == {0}


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])  # [V]
    penalized = logits.clone()
    Sampler(opts(repeat_penalty=2.0)).apply_penalties(penalized, [0, 1, 1])
    assert penalized.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_repeat_last_n_limits_the_window():
    logits = torch.tensor([2.0, 2.0, 2.0])  # [V]
    for last_n, expected in [(1, [2.0, 2.0, 1.0]), (-1, [1.0, 1.0, 1.0]), (0, [2.0] * 3)]:
        penalized = logits.clone()
        Sampler(opts(repeat_penalty=2.0, repeat_last_n=last_n)).apply_penalties(
            penalized, [0, 1, 2])
        assert penalized.tolist() == expected, last_n


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(4)  # [V]
    Sampler(opts(presence_penalty=0.5, frequency_penalty=0.25)).apply_penalties(
        logits, [1, 2, 2, 2])
    assert logits.tolist() == pytest.approx([0.0, -0.75, -1.25, 0.0])


def test_repeat_penalty_changes_the_greedy_choice():
    logits = torch.tensor([3.0, 2.0, 1.0])  # [V]
    assert Sampler(opts(temperature=0)).sample(logits, [0])[0] == 0
    assert Sampler(opts(temperature=0, repeat_penalty=2.0)).sample(logits, [0])[0] == 1


def test_penalized_distribution_is_what_is_sampled():
    logits = torch.log(torch.tensor([0.5, 0.5]))  # [V]
    sampler = Sampler(opts(temperature=1.0, frequency_penalty=math.log(3), seed=5))
    freq = draw_counts(sampler, logits, draws=3000, history=[0])
    assert freq[0] == pytest.approx(0.25, abs=0.03)  # odds 1:3 after subtracting log 3


def test_bad_inputs_are_value_errors():
    sampler = Sampler(opts(repeat_penalty=1.2))
    with pytest.raises(ValueError, match="outside"):
        sampler.sample(torch.zeros(4), [7])
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(torch.tensor([0.0, float("nan")]), [])
    with pytest.raises(ValueError, match="one vector"):
        sampler.sample(torch.zeros(2, 4), [])


def test_logits_are_not_modified_in_place():
    logits = torch.tensor([2.0, 1.0])  # [V]
    Sampler(opts(temperature=0, repeat_penalty=2.0)).sample(logits, [0])
    assert logits.tolist() == [2.0, 1.0]


def reference_kept(logits, top_k, top_p, min_p):
    """Sort everything, then top_k, top_p, min_p as the module docstring describes."""
    values, ids = torch.sort(logits, descending=True)
    if top_k:
        values, ids = values[:top_k], ids[:top_k]
    probs = torch.softmax(values, -1)
    keep = (torch.cumsum(probs, -1) - probs < top_p) & (probs >= min_p * probs[0])
    keep[0] = True
    return set(ids[keep].tolist())


@pytest.mark.parametrize("top_k,top_p,min_p", [
    (0, 0.9, 0.0), (0, 0.99, 0.0), (0, 0.5, 0.01), (0, 1.0, 0.02), (0, 1.0, 0.0),
    (50, 0.9, 0.0), (50, 1.0, 0.1), (3000, 0.8, 0.0),
])
@pytest.mark.parametrize("scale", [0.3, 3.0])  # near-flat (a wide nucleus) and peaked logits
def test_candidates_match_a_full_sort(top_k, top_p, min_p, scale):
    logits = random_logits(11, vocab_size=2000) * scale
    sampler = Sampler(opts(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p))
    _, ids = sampler._candidates(logits)
    assert set(ids.tolist()) == reference_kept(logits, top_k, top_p, min_p)
