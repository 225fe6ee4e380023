"""KD losses against direct computations."""

from __future__ import annotations

import pytest
import torch

from softlabels.labeler.topk import topk_with_tail
from softlabels.trainer.losses import chunked_loss, position_loss


def teacher_labels(teacher_logits: torch.Tensor, k: int):
    # topk_with_tail masks the head's output in place; with an identity head
    # that output is the input, so hand it a copy.
    ids, lp, tail = topk_with_tail(teacher_logits.clone(), torch.nn.Identity(), k, chunk=64)
    return ids.long(), lp, tail


def test_tail_kl_with_k_equal_vocab_is_full_kl():
    torch.manual_seed(0)
    v = 50
    t_logits, s_logits = torch.randn(20, v) * 3, torch.randn(20, v) * 3
    ids, lp, tail = teacher_labels(t_logits, v)
    got = position_loss(s_logits, "tail-kl", ids, lp, tail)
    p = torch.log_softmax(t_logits.double(), -1)
    q = torch.log_softmax(s_logits.double(), -1)
    full = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(got.double(), full, atol=1e-5, rtol=0)


def test_tail_kl_with_small_k_is_kl_of_the_bucketed_distributions():
    torch.manual_seed(1)
    v, k = 40, 5
    t_logits, s_logits = torch.randn(10, v) * 2, torch.randn(10, v) * 2
    ids, lp, tail = teacher_labels(t_logits, k)
    got = position_loss(s_logits, "tail-kl", ids, lp, tail)
    p = torch.softmax(t_logits.double(), -1)
    q = torch.softmax(s_logits.double(), -1)
    pb = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got.double(), (pb * (pb.log() - qb.log())).sum(-1), atol=1e-5, rtol=0)
    # and it is below the full KL (bucketing loses information, never adds)
    full = (p * (p.log() - q.log())).sum(-1)
    assert (got.double() <= full + 1e-6).all()


def test_one_hot_teacher_gives_cross_entropy():
    torch.manual_seed(2)
    s_logits = torch.randn(8, 30)
    targets = torch.randint(0, 30, (8,))
    ids = targets[:, None]
    lp = torch.zeros(8, 1)
    tail = torch.full((8,), float("-inf"))
    got = position_loss(s_logits, "tail-kl", ids, lp, tail)
    ce = torch.nn.functional.cross_entropy(s_logits, targets, reduction="none")
    torch.testing.assert_close(got, ce, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["tail-kl", "topk-kl", "reverse-kl"])
def test_gradients_are_finite_for_extreme_inputs(kind):
    v, k = 30, 4
    s_logits = torch.randn(6, v) * 200  # student probabilities underflow
    s_logits[0, :] = 0
    s_logits.requires_grad_(True)
    ids = torch.arange(k).repeat(6, 1)
    lp = torch.log_softmax(torch.randn(6, k), -1)
    tail = torch.full((6,), float("-inf"))  # tail mass 0
    tail[1] = -1e-7  # tail mass ~1
    lp[1] = -20.0
    loss = position_loss(s_logits, kind, ids, lp, tail).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_logits.grad).all()


def _batch(b=3, t=9, k=4, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [t, t - 3, 2]
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    t_logits = torch.randn(b, t, v, generator=g) * 2
    ids, lp, tail = teacher_labels(t_logits.reshape(-1, v), k)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[~mask] = -100
    return {
        "label_mask": mask,
        "topk_ids": ids.long().reshape(b, t, k),
        "topk_logprobs": lp.reshape(b, t, k),
        "tail_logprob": tail.reshape(b, t),
        "targets": targets,
    }


@pytest.mark.parametrize("kind", ["tail-kl", "topk-kl", "reverse-kl", "ce"])
def test_chunked_loss_equals_unchunked_and_respects_the_mask(kind):
    torch.manual_seed(3)
    batch = _batch()
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(3, 9, 8, requires_grad=True)
    l1, _ = chunked_loss(hidden, head, kind, batch, chunk=1000)
    g1 = torch.autograd.grad(l1, hidden)[0]
    l2, _ = chunked_loss(hidden, head, kind, batch, chunk=3)
    g2 = torch.autograd.grad(l2, hidden)[0]
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    # masked positions get no gradient and do not change the loss
    assert g1[~batch["label_mask"]].abs().max() == 0
    hidden2 = hidden.detach().clone()
    hidden2[~batch["label_mask"]] = 1e3
    l3, _ = chunked_loss(hidden2, head, kind, batch)
    torch.testing.assert_close(l1.detach(), l3)
    # direct computation over the masked positions
    m = batch["label_mask"]
    logits = head(hidden.detach()[m])
    kw = {k: batch[k][m] for k in ("topk_ids", "topk_logprobs", "tail_logprob")}
    if kind == "ce":
        tg = batch["targets"][m]
        ref = position_loss(logits, "ce", targets=tg).sum() / (tg != -100).sum()
    else:
        ref = position_loss(logits, kind, kw["topk_ids"], kw["topk_logprobs"], kw["tail_logprob"]).mean()
    torch.testing.assert_close(l1.detach(), ref)


def test_alpha_mixes_kd_and_ce():
    torch.manual_seed(4)
    batch = _batch()
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(3, 9, 8)
    kd, _ = chunked_loss(hidden, head, "tail-kl", batch, alpha=1.0)
    ce, _ = chunked_loss(hidden, head, "ce", batch)
    mix, parts = chunked_loss(hidden, head, "tail-kl", batch, alpha=0.25)
    torch.testing.assert_close(mix, 0.25 * kd + 0.75 * ce)
    assert parts["kd"] == pytest.approx(float(kd.detach())) and parts["ce"] == pytest.approx(float(ce.detach()))


def test_tail_sampled_loss_with_exact_tail_weights_has_the_full_kl_gradient():
    """The loss is linear in the draw weights, so its expectation is this exact-weight case:
    value = full KL + p_tail * H(teacher within the tail), gradient = the full-vocabulary KL's."""
    torch.manual_seed(3)
    v, k = 40, 6
    t_logits = torch.randn(12, v) * 2
    s_logits = (torch.randn(12, v) * 2).double().requires_grad_(True)
    ids, lp, tail = teacher_labels(t_logits, k)
    p = torch.softmax(t_logits.double(), -1)
    p_rest = p.scatter(-1, ids, 0.0)
    within = p_rest / p_rest.sum(-1, keepdim=True)
    all_ids = torch.arange(v).expand(12, v)
    got = position_loss(s_logits, "tail-sampled", ids, lp, tail, tail_samples=(all_ids, within.float()))
    q = torch.log_softmax(s_logits, -1)
    full = (p * (p.log() - q)).sum(-1)
    h_within = -(within * torch.where(within > 0, within.log(), torch.zeros_like(within))).sum(-1)
    torch.testing.assert_close(got.double(), full + p_rest.sum(-1) * h_within, atol=2e-4, rtol=0)
    g_got = torch.autograd.grad(got.sum(), s_logits)[0]
    s2 = s_logits.detach().clone().requires_grad_(True)
    g_full = torch.autograd.grad((p * (p.log() - torch.log_softmax(s2, -1))).sum(), s2)[0]
    torch.testing.assert_close(g_got, g_full, atol=2e-4, rtol=0)
    # tail-kl alone does not have that gradient: the within-tail term is what the samples add
    g_bucket = torch.autograd.grad(position_loss(s2, "tail-kl", ids, lp, tail).sum(), s2)[0]
    assert (g_bucket - g_full).abs().max() > 1e-2


def test_tail_sampled_without_draws_is_tail_kl_and_refuses_missing_samples():
    torch.manual_seed(4)
    t_logits, s_logits = torch.randn(5, 30), torch.randn(5, 30)
    ids, lp, tail = teacher_labels(t_logits, 4)
    zeros = (torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3))
    torch.testing.assert_close(position_loss(s_logits, "tail-sampled", ids, lp, tail, tail_samples=zeros),
                               position_loss(s_logits, "tail-kl", ids, lp, tail))
    with pytest.raises(ValueError, match="needs tail samples"):
        position_loss(s_logits, "tail-sampled", ids, lp, tail)


def _with_targets(batch, t_logits_seed=0, v=40):
    """The batch with the teacher's exact log-prob of each next token (a set with target_logprob, one tokenizer)."""
    g = torch.Generator().manual_seed(t_logits_seed + 100)
    b, t = batch["targets"].shape
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g) * 2, -1)
    ok = batch["targets"] != -100
    target = teacher.gather(-1, batch["targets"].clamp_min(0)[..., None]).squeeze(-1)
    ok[0, 2] = False  # a position the teacher did not score (NaN in the set): no estimate there
    return {**batch, "chunk_len": ok.long(), "chunk_logprob": torch.where(ok, target, torch.zeros_like(target))}, ok, target


def _next_token_logq(head, hidden, batch):
    """A fresh leaf of ``hidden`` and, from it, the student's log-prob of each position's true next token."""
    h = hidden.detach().clone().requires_grad_(True)
    return h, torch.log_softmax(head(h), -1).gather(-1, batch["targets"].clamp_min(0)[..., None]).squeeze(-1)


def test_sampled_reverse_kl_is_the_estimate_with_the_score_function_gradient():
    torch.manual_seed(5)
    batch, ok, target = _with_targets(_batch())
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(3, 9, 8, requires_grad=True)
    loss, parts = chunked_loss(hidden, head, "reverse-kl-sampled", batch, alpha=1.0, chunk=5)
    grad = torch.autograd.grad(loss, hidden)[0]
    # direct: value mean over scored positions of log q(y) - log p(y); gradient (log q - log p) grad log q, averaged
    h, logq = _next_token_logq(head, hidden, batch)
    est = (logq - target)[ok]
    torch.testing.assert_close(loss.detach(), est.mean().detach())
    surrogate = (est.detach() * logq[ok]).sum() / ok.sum()
    torch.testing.assert_close(grad, torch.autograd.grad(surrogate, h)[0])
    assert grad[~ok].abs().max() == 0 and parts["kd"] == pytest.approx(float(est.mean().detach()))
    # its expectation over y ~ q is the gradient of KL(q || p): checked exactly by summing over every y of one position
    z = torch.randn(40, requires_grad=True)
    p = torch.log_softmax(torch.randn(40), -1)
    q = torch.log_softmax(z, -1)
    from softlabels.trainer.losses import sampled_reverse_kl

    expected = sum(q[y].exp().detach() * sampled_reverse_kl(q[y], p[y]) for y in range(40))
    exact = (q.exp() * (q - p)).sum()
    g_expected = torch.autograd.grad(expected, z, retain_graph=True)[0]
    torch.testing.assert_close(g_expected, torch.autograd.grad(exact, z)[0])


def test_kl_mix_mixes_forward_and_reverse_and_reverse_losses_refuse_sets_without_targets():
    torch.manual_seed(6)
    batch = _batch()
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(3, 9, 8)
    fwd, _ = chunked_loss(hidden, head, "tail-kl", batch)
    rev, _ = chunked_loss(hidden, head, "reverse-kl", batch)
    mix, _ = chunked_loss(hidden, head, "kl-mix", batch, reverse_weight=0.3)
    torch.testing.assert_close(mix, 0.7 * fwd + 0.3 * rev)
    with pytest.raises(ValueError, match="target_logprob"):
        chunked_loss(hidden, head, "reverse-kl-sampled", batch)
    from softlabels.trainer.config import resolve_weights

    assert resolve_weights(None, None, False, True, loss="reverse-kl-sampled") == {
        "alpha": 1.0, "chunk_weight": 0.0, "chunk_distance": "binary"}
    assert resolve_weights(None, None, False, True, loss="tail-kl") == {
        "alpha": 0.5, "chunk_weight": 1.0, "chunk_distance": "binary"}


def test_sampled_reverse_kl_takes_truncated_importance_weights_from_the_sampler():
    torch.manual_seed(7)
    batch, ok, target = _with_targets(_batch())
    g = torch.Generator().manual_seed(8)
    sampler = -torch.rand(batch["targets"].shape, generator=g) * 6  # the generator's log-probs of the tokens
    batch = {**batch, "sampler_logprob": sampler}
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(3, 9, 8, requires_grad=True)
    loss, _ = chunked_loss(hidden, head, "reverse-kl-sampled", batch, alpha=1.0, importance_cap=2.0)
    grad = torch.autograd.grad(loss, hidden)[0]
    h, logq = _next_token_logq(head, hidden, batch)
    w = (logq.detach() - sampler).exp().clamp(max=2.0)[ok]
    assert (w < 2.0).any() and (w == 2.0).any()  # both sides of the cap are exercised
    est = (logq - target)[ok]
    torch.testing.assert_close(loss.detach(), (w * est).mean().detach())
    surrogate = (w * est.detach() * logq[ok]).sum() / ok.sum()
    torch.testing.assert_close(grad, torch.autograd.grad(surrogate, h)[0])
    off, _ = chunked_loss(hidden, head, "reverse-kl-sampled", batch, alpha=1.0, importance_cap=0.0)
    torch.testing.assert_close(off.detach(), est.mean().detach())  # cap 0: no weights
