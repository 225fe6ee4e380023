"""Responses written by a model: batched sampling with a KV cache, each response a function of its own key.

Used by the labeler's generation stage (``softlabels label --generate-with``) and by ``softlabels eval
--teacher`` (the on-policy metric). A response is determined by the generator, the prompt, the settings and
``(seed, prompt id, sample index)`` alone, whatever the batch it is generated in: every row draws its own
Gumbel noise from a generator seeded by :func:`row_seed`, one vocabulary-sized draw per step, and the token
is ``argmax(log p + noise)`` (the Gumbel-max trick: a sample of ``p``). Batch shape changes the logits only by
float rounding (padding, kernels), so a token changes only where two perturbed scores tie within it.

The log-prob stored for each sampled token is under the distribution it was drawn from: the generator's
logits at ``temperature``, restricted to the top-p nucleus and renormalized (0 under greedy decoding,
temperature 0). Imports torch and transformers when called, not when imported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from softlabels.schemas.errors import UserError


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are sampled (recorded in the manifest's ``generation``)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    samples_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("max_new_tokens", 1), ("samples_per_prompt", 1), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                flag = name.replace("_", "-")
                raise UserError(f"--{flag} must be an integer >= {low}, got {v!r:.60}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise UserError(f"--sampling-temperature must be a finite number >= 0 (0: greedy), got {t!r:.60}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {p!r:.60}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    def record(self) -> dict[str, Any]:
        return asdict(self)


def row_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The seed of one response's noise: a hash of ``(seed, prompt id, sample index)`` (63 bits)."""
    h = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def stop_ids(tokenizer: Any, chat_template: str | None = None) -> list[int]:
    """The ids a response ends at: EOS, and with a chat template the token that closes an assistant turn
    (the first special token the template writes after a turn's content, e.g. ``<|im_end|>``)."""
    out = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if chat_template:
        marker = "\u2063probe\u2063"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": marker}],
                                                 chat_template=chat_template, tokenize=False)
        except Exception:  # a template that needs more than this: EOS only
            text = ""
        after = text[text.find(marker) + len(marker):] if marker in text else ""
        special = set(getattr(tokenizer, "all_special_ids", []) or []) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        for i in tokenizer(after, add_special_tokens=False)["input_ids"] if after else []:
            if i in special:
                if i not in out:
                    out.append(int(i))
                break
    return out


@dataclass
class Response:
    ids: np.ndarray  # [n] int32, the stop token included when one was sampled
    logprobs: np.ndarray  # [n] float32: each token's log-prob under the distribution it was drawn from
    stopped: bool  # ended at a stop id (else at its token budget)


class _GumbelSampler:
    """A logits processor that samples each row from its own noise and forces that choice (greedy decoding
    then takes it), recording the chosen token's log-prob."""

    def __init__(self, seeds: Sequence[int], settings: GenerationSettings, vocab: int) -> None:
        import torch

        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.settings, self.vocab = settings, vocab
        self.logprobs: list[list[float]] = [[] for _ in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        x = scores.float()
        v = x.shape[-1]
        if self.vocab < v:  # head rows past the tokenizer (padded heads) are never sampled
            x[:, self.vocab:] = float("-inf")
        t, top_p = self.settings.temperature, self.settings.top_p
        logp = torch.log_softmax(x / (t if t > 0 else 1.0), dim=-1)
        if top_p < 1.0:
            logp = nucleus(logp, top_p)
        if t > 0:
            noise = torch.stack([-torch.log(-torch.log(torch.rand(v, generator=g, dtype=torch.float64)
                                                       .clamp_(1e-300, 1.0 - 1e-16))) for g in self.gens])
            choice = (logp.double() + noise.to(logp.device)).argmax(-1)
        else:
            choice = logp.argmax(-1)
            logp = torch.zeros_like(logp)  # greedy: the chosen token had probability 1
        chosen = logp.gather(-1, choice[:, None]).squeeze(-1).tolist()
        for row, lp in enumerate(chosen):
            self.logprobs[row].append(lp)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, choice[:, None], 0.0)
        return out


def nucleus(logp: Any, top_p: float) -> Any:
    """Log-probs restricted to the smallest set of most likely ids whose mass reaches ``top_p``, renormalized."""
    import torch

    order = logp.argsort(-1, descending=True)
    sorted_lp = logp.gather(-1, order)
    before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the more likely ids
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = logp.masked_fill(drop, float("-inf"))
    return kept - torch.logsumexp(kept, -1, keepdim=True)


def sample_responses(model: Any, prompts: Sequence[np.ndarray], keys: Sequence[int], budgets: Sequence[int],
                     settings: GenerationSettings, stops: Sequence[int], vocab: int, pad_id: int,
                     batch_tokens: int = 4096) -> list[Response]:
    """One response per prompt (``keys``: each one's :func:`row_seed`; ``budgets``: its most new tokens).

    Prompts are batched by length (left-padded), each batch at most ``batch_tokens`` prompt + response
    tokens; the batching is a function of the prompts alone. Returns the responses in prompt order."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[Response | None] = [None] * len(prompts)
    start = 0
    while start < len(order):
        width = len(prompts[order[start]]) + max(budgets[i] for i in order[start:])
        n = max(1, min(len(order) - start, batch_tokens // max(1, width)))
        batch = order[start:start + n]
        start += n
        plen = max(len(prompts[i]) for i in batch)
        new = max(budgets[i] for i in batch)
        ids = torch.full((len(batch), plen), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), plen), dtype=torch.long)
        for r, i in enumerate(batch):
            p = torch.as_tensor(np.asarray(prompts[i], np.int64))
            ids[r, plen - len(p):] = p
            mask[r, plen - len(p):] = 1
        sampler = _GumbelSampler([keys[i] for i in batch], settings, vocab)
        config = GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=0, eos_token_id=list(stops) or None,
                                  pad_token_id=pad_id, num_beams=1, use_cache=True)
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                  logits_processor=LogitsProcessorList([sampler]))
        gen = seqs[:, plen:].cpu().numpy()
        for r, i in enumerate(batch):
            toks = gen[r, :budgets[i]]
            lps = np.asarray(sampler.logprobs[r][:budgets[i]], np.float32)
            ends = [j for j, tok in enumerate(toks.tolist()) if tok in stops]
            stopped = bool(ends)
            if stopped:
                toks, lps = toks[:ends[0] + 1], lps[:ends[0] + 1]
            out[i] = Response(toks.astype(np.int32), lps[:len(toks)], stopped)
    return out  # type: ignore[return-value]
