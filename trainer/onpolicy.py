"""The on-policy metric (``softlabels eval --teacher``, ``compare --teacher``): on held-out prompts the student
writes responses and the teacher scores every token of them.

Per response token ``y_t`` (drawn from the student ``q`` given the prompt and ``y_<t``):

- ``onpolicy_reverse_kl``: ``KL(q || p)`` over the whole vocabulary at that position, from both models' full
  logits, averaged over the response tokens (what on-policy distillation minimizes);
- ``onpolicy_teacher_logprob``: the teacher's ``log p(y_t)``, averaged (how likely the teacher finds what the
  student writes).

The held-out prompts are the untrained prefixes of the set's held-out rows (a chat row's turns up to the
assistant's, a prompt-completion row's prompt; a plain-text row's first ``prompt_tokens`` tokens), each once.
Only this needs the teacher: the trainer itself never does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from softlabels.schemas.errors import UserError

from softlabels.common.generate import GenerationSettings, row_seed, sample_responses


def teacher_path(spec: str) -> str:
    """``--teacher``: a model directory, an HF id, or the alias of a built-in teacher that `softlabels label` has
    already converted (its cached directory; the trainer never converts one itself)."""
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    cached = Path(os.environ.get("SOFTLABELS_CACHE") or Path.home() / ".cache" / "softlabels") / "teachers" / spec
    if (cached / "config.json").exists():
        return str(cached)
    if spec.startswith((".", "/", "~")):
        raise UserError(f"--teacher {spec}: no such directory")
    return spec


def held_out_prompts(samples: Any, n: int, prompt_tokens: int = 32) -> list[tuple[str, np.ndarray]]:
    """Up to ``n`` distinct prompts ``(key, ids)`` from held-out samples, in their order."""
    seen: set[bytes] = set()
    out = []
    for s in samples:
        pos = s.label_positions
        if not len(pos):
            continue
        first = int(pos[0])
        ids = np.asarray(s.input_ids[:first + 1] if first > 0 else s.input_ids[:prompt_tokens], np.int32)
        key = ids.tobytes()
        if key in seen or len(ids) < 1:
            continue
        seen.add(key)
        out.append((s.sample_id, ids))
        if len(out) >= n:
            break
    return out


@torch.no_grad()
def onpolicy_metric(student: Any, teacher: Any, prompts: list[tuple[str, np.ndarray]], settings: GenerationSettings,
                    stops: list[int], vocab: int, pad_id: int, max_length: int) -> dict[str, Any]:
    """Sample one response per prompt from ``student`` and score it with ``teacher`` (see the module doc)."""
    if not prompts:
        raise UserError("no held-out prompts to sample from (the split holds no labeled rows)")
    keys = [row_seed(settings.seed, key, 0) for key, _ in prompts]
    ids = [p for _, p in prompts]
    budgets = [max(1, min(settings.max_new_tokens, max_length - len(p))) for p in ids]
    responses = sample_responses(student, ids, keys, budgets, settings, stops, vocab, pad_id)
    kl_sum = lp_sum = 0.0
    tokens = 0
    s_dev = next(student.parameters()).device
    t_dev = next(teacher.parameters()).device
    for p, r in zip(ids, responses):
        if not len(r.ids):
            continue
        full = torch.as_tensor(np.concatenate([p, r.ids]).astype(np.int64))[None]
        at = slice(len(p) - 1, len(p) - 1 + len(r.ids))  # the positions that predicted the response's tokens
        q = torch.log_softmax(student(full.to(s_dev)).logits[0, at].float().cpu()[:, :vocab], -1)
        t = torch.log_softmax(teacher(full.to(t_dev)).logits[0, at].float().cpu()[:, :vocab], -1)
        kl_sum += float((q.exp() * (q - t)).sum())
        lp_sum += float(t.gather(-1, torch.as_tensor(r.ids, dtype=torch.long)[:, None]).sum())
        tokens += len(r.ids)
    return {"onpolicy_reverse_kl": kl_sum / max(1, tokens), "onpolicy_teacher_logprob": lp_sum / max(1, tokens),
            "onpolicy_tokens": tokens, "onpolicy_prompts": len(prompts),
            "onpolicy_stopped": sum(r.stopped for r in responses) / len(responses),
            "onpolicy_settings": settings.record()}


def load_teacher(spec: str, device: Any = "cpu", trust_remote_code: bool = False) -> Any:
    """The teacher for the on-policy metric (one line if it cannot be loaded)."""
    from transformers import AutoModelForCausalLM

    try:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path(spec), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"--teacher {spec}: cannot be loaded ({str(e).splitlines()[0][:160]})") from e
    return teacher.to(device).eval()


def evaluate_onpolicy(model: Any, labels: Any, teacher: Any, split_samples: Any, settings: GenerationSettings,
                      prompts: int) -> dict[str, Any]:
    """:func:`onpolicy_metric` of ``model`` on ``prompts`` held-out prompts of ``labels`` (``split_samples``)."""
    from softlabels.common.generate import stop_ids
    from softlabels.trainer.student import load_label_tokenizer

    tok = load_label_tokenizer(labels)
    m = labels.manifest
    chat = (m.rendering or {}).get("format") == "chat"
    stops = stop_ids(tok, getattr(tok, "chat_template", None) if chat else None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    found = held_out_prompts(split_samples, prompts)
    return onpolicy_metric(model.eval(), teacher, found, settings, stops, len(tok), int(pad), m.sequence.max_length)
