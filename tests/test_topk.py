"""The labeler's chunked head against a direct full-softmax computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabels.labeler.topk import topk_with_tail


def direct(hidden, head, k, temperature=1.0):
    logits = head(hidden).double() / temperature
    logp = torch.log_softmax(logits, -1)
    vals, ids = torch.topk(logp, k, -1)
    rest = logp.clone().scatter_(-1, ids, float("-inf"))
    return ids, vals, torch.logsumexp(rest, -1)


@pytest.fixture
def head():
    torch.manual_seed(0)
    h = torch.nn.Linear(16, 97, bias=False)
    with torch.no_grad():
        h.weight.mul_(8)
    return h


@pytest.mark.parametrize("k", [1, 8, 97])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_full_softmax(head, k, temperature):
    hidden = torch.randn(50, 16)
    ids, lp, tail = topk_with_tail(hidden, head, k, temperature, chunk=16)
    rids, rlp, rtail = direct(hidden, head, k, temperature)
    assert torch.equal(ids.long(), rids)
    torch.testing.assert_close(lp.double(), rlp, rtol=0, atol=2e-5)
    if k == 97:
        assert torch.isneginf(tail).all()
    else:
        torch.testing.assert_close(tail.double(), rtail, rtol=0, atol=2e-5)
        # top-k + tail is a complete distribution
        total = torch.logsumexp(torch.cat([lp, tail[:, None]], -1).double(), -1)
        torch.testing.assert_close(total, torch.zeros(50, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_target_logprobs_match_full_softmax_in_and_out_of_the_topk(head, temperature):
    """The log-prob of the token that follows, whether in the top-k or not; NaN where none follows; with tail
    samples too (the extra comes last); the other columns as without it."""
    hidden = torch.randn(60, 16)
    logp = torch.log_softmax(head(hidden).double() / temperature, -1)
    targets = torch.randint(0, 97, (60,))
    targets[:8] = logp[:8].argmax(-1)  # some in the top-k for sure
    targets[[10, 33, 59]] = -1  # no token follows there
    ids, lp, tail, target = topk_with_tail(hidden, head, 8, temperature, chunk=16, targets=targets)
    want = logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    want[targets < 0] = float("nan")
    torch.testing.assert_close(target.double(), want, rtol=0, atol=2e-5, equal_nan=True)
    inside = (ids.long() == targets[:, None]).any(-1)
    assert inside.sum() >= 8 and (~inside & (targets >= 0)).sum() > 20  # both cases are exercised
    at = (ids.long() == targets[:, None]).float().argmax(-1)
    assert torch.equal(target[inside], lp[inside].gather(-1, at[inside, None]).squeeze(-1))  # its entry's value
    plain = topk_with_tail(hidden, head, 8, temperature, chunk=16)
    assert all(torch.equal(a, b) for a, b in zip(plain, (ids, lp, tail)))
    *_, drawn, counts, again = topk_with_tail(hidden, head, 8, temperature, chunk=16, tail_samples=3,
                                              generator=torch.Generator().manual_seed(0), targets=targets)
    assert drawn.shape == counts.shape == (60, 3)
    assert torch.allclose(again, target, equal_nan=True)


def test_tail_is_exact_when_topk_holds_almost_all_mass():
    head = torch.nn.Linear(4, 10, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = 30.0  # p(top-1) ~ 1 - 9e-13
    hidden = torch.tensor([[1.0, 0, 0, 0]])
    _, lp, tail = topk_with_tail(hidden, head, 1)
    # log(9 e^0 / (e^30 + 9)) computed exactly; log(1 - sum p) would give -inf or garbage.
    expected = torch.log(torch.tensor(9.0, dtype=torch.float64)) - torch.logsumexp(torch.tensor([30.0] + [0.0] * 9, dtype=torch.float64), 0)
    assert abs(float(tail[0]) - float(expected)) < 1e-4


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_results_do_not_depend_on_chunk_size(head, chunk):
    hidden = torch.randn(64, 16)
    ref = topk_with_tail(hidden, head, 5, chunk=64)
    got = topk_with_tail(hidden, head, 5, chunk=chunk)
    assert torch.equal(ref[0], got[0])
    # different chunk sizes use different matmul kernels: equal up to fp32 rounding
    for a, b in zip(ref[1:], got[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_k_above_vocab_is_refused(head):
    with pytest.raises(ValueError, match="exceeds"):
        topk_with_tail(torch.randn(2, 16), head, 98)


def test_rows_whose_rest_underflows_fall_back_to_the_exact_tail():
    """exp(z - max) underflows fp32 below ~1e-45: such rows are redone with a masked logsumexp."""
    head = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = 200.0  # rest is e^-200 of the top-1: 0 in fp32 after exp
    hidden = torch.tensor([[1.0, 0, 0, 0], [0.0, 1.0, 0, 0]])
    _, _, tail = topk_with_tail(hidden, head, 1)
    want = torch.log(torch.tensor(5.0, dtype=torch.float64)) - 200.0
    assert abs(float(tail[0]) - float(want)) < 1e-3 and torch.isfinite(tail).all()
    assert abs(float(tail[1]) - float(torch.log(torch.tensor(5 / 6)))) < 1e-6


def test_tail_samples_follow_the_tail_distribution_and_are_reproducible(head):
    hidden = torch.randn(6, 16)
    k, draws = 5, 255
    gen = torch.Generator().manual_seed(7)
    ids, lp, tail, sids, counts = topk_with_tail(hidden, head, k, chunk=4, tail_samples=draws, generator=gen)
    again = topk_with_tail(hidden, head, k, chunk=4, tail_samples=draws, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sids, again[3]) and torch.equal(counts, again[4])
    assert (counts.long().sum(1) == draws).all()
    p = torch.softmax(head(hidden).double(), -1)
    for row in range(6):
        used = counts[row] > 0
        drawn = sids[row][used].long()
        assert len(set(drawn.tolist())) == len(drawn)  # distinct, left-aligned
        assert not used[used.sum():].any()
        assert not set(drawn.tolist()) & set(ids[row].long().tolist())  # never a top-k id
        # Empirical frequencies vs p restricted to the tail (255 draws: loose, 5 sigma).
        p_tail = p[row].clone()
        p_tail[ids[row].long()] = 0
        p_tail /= p_tail.sum()
        freq = torch.zeros_like(p_tail)
        freq[drawn] = counts[row][used].double() / draws
        sigma = (p_tail * (1 - p_tail) / draws).sqrt()
        assert ((freq - p_tail).abs() <= 5 * sigma + 1e-9).all()


def test_no_tail_means_no_samples(head):
    out = topk_with_tail(torch.randn(3, 16), head, 97, tail_samples=4, generator=torch.Generator().manual_seed(0))
    assert (out[4] == 0).all()


def test_unit_labels_are_flat_per_position_and_slice_back_per_sequence():
    """The typed seam between teacher and writer: per-sequence columns in, flat arrays, the same slices out."""
    from softlabels.labeler.seams import UnitInput, UnitLabels

    rng = np.random.default_rng(0)
    lengths = (3, 1, 4)
    per = [{"topk_ids": rng.integers(0, 50, (n, 2)), "topk_logprobs": rng.random((n, 2), dtype=np.float32),
            "tail_logprob": rng.random(n, dtype=np.float32), "tail_sample_ids": rng.integers(0, 50, (n, 3)),
            "tail_sample_counts": rng.integers(0, 3, (n, 3))} for n in lengths]
    labels = UnitLabels.concat(per)
    assert labels.lengths == lengths and labels.topk_ids.shape == (8, 2) and set(labels.extras) == {
        "tail_sample_ids", "tail_sample_counts"}
    for i, cols in enumerate(per):
        got = labels.sequence(i)
        assert set(got) == set(cols) and all(np.array_equal(got[k], cols[k]) for k in cols)
    with pytest.raises(ValueError, match="tail_logprob has 7 rows for 8 positions"):
        UnitLabels(lengths, labels.topk_ids, labels.topk_logprobs, labels.tail_logprob[:7])
    with pytest.raises(ValueError, match="unknown label columns"):
        UnitLabels(lengths, labels.topk_ids, labels.topk_logprobs, labels.tail_logprob, {"offsets": labels.tail_logprob})
    unit = UnitInput(("a#0", "b#0", "c#0"), tuple(np.arange(n, dtype=np.int32) for n in lengths))
    assert unit.lengths == lengths and unit.tokens == 8
    with pytest.raises(ValueError, match="2 sources for 3 sequences"):
        UnitInput(("a#0", "b#0"), unit.input_ids)
