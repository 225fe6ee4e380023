"""The generation stage (``softlabels label --generate-with teacher|DIR``): prompts become responses, then labels.

A prompts-only corpus (chat rows that end with a user turn, ``prompt`` rows without a completion, plain text
with ``--format prompt``) is planned as usual, each prompt planned ``--samples-per-prompt`` times
(:func:`prompt_sequences`); a unit of prompts goes to a generator (the teacher replica itself, or a
:class:`GeneratorActor` beside it), which returns the unit completed (:func:`complete_unit`): prompt + response,
the response's positions trained, the prompt's not, and the generator's log-prob of every token it sampled.
The teacher then labels the completed unit exactly as it labels any corpus row (a second pass over prompt +
response: see docs/labeler.md, "Responses written by models", for why), and the shard is committed as any.

A response depends on the generator, the prompt, the settings and ``(seed, prompt id, sample index)`` only
(:mod:`softlabels.common.generate`), so a resumed run regenerates exactly what a killed one lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from softlabels.labeler.corpus import Document
from softlabels.labeler.plan import PlanCounts, Rendering, Sequence
from softlabels.labeler.seams import UnitInput
from softlabels.schemas.errors import UserError

from softlabels.common.generate import GenerationSettings, Response, row_seed, sample_responses


@dataclass(frozen=True)
class GenerationJob:
    """What a generator needs besides its model: the run's settings, where responses stop, how long a
    sequence may be, and the teacher tokenizer's byte length per id (to extend stored spans; None: none)."""

    settings: GenerationSettings
    stops: tuple[int, ...]
    max_length: int
    vocab: int  # ids below this can be sampled (the tokenizer's size)
    pad_id: int
    batch_tokens: int = 4096
    span_lengths: np.ndarray | None = None
    model: tuple[str, str] | None = None  # a generator directory and its weights' sha256 (None: the teacher)


def render_prompts(docs: list[Document], tokenizer: Any, rendering: Rendering,
                   refused: Callable[[BaseException], None]) -> list[tuple]:
    """``(doc_id, prompt ids, None, spans)`` per prompt: a conversation through the chat template with the
    assistant's turn opened (the generation prompt), a plain prompt as the tokenizer writes it (BOS as for
    text). One line each (``refused``) for an empty prompt, a conversation that ends with an assistant turn,
    and a prompt that leaves no room for a response within ``--max-length``."""
    from softlabels.labeler.chat import check_messages, compiled_template
    from softlabels.labeler.plan import _spans, _zeros_around

    out = []
    for d in docs:
        try:
            if rendering.format == "chat":
                msgs = check_messages(d.messages or [], d.doc_id)
                if not msgs:
                    raise UserError(f"{d.doc_id}: an empty conversation is no prompt")
                if msgs[-1]["role"] != "user":
                    raise UserError(f"{d.doc_id}: the conversation ends with a{'n' if msgs[-1]['role'][0] in 'aeiou' else ''} "
                                    f"{msgs[-1]['role']} turn; with --generate-with each row is a prompt whose last turn is "
                                    "the user's (the response is written for it): drop the trailing turns, or label the "
                                    "rows as they are without --generate-with")
                template = compiled_template(tokenizer, rendering.chat_template, rendering.date)
                shown = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
                with template.budget(d.doc_id, rendering.render_steps, rendering.render_seconds):
                    text = template.render(shown, True, d.doc_id)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                spans = _spans(rendering, d.doc_id, [(ids, text)])
            else:
                text = d.messages[0]["content"] if d.messages else d.text
                if not text.strip():
                    raise UserError(f"{d.doc_id}: an empty prompt")
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                spans = _spans(rendering, d.doc_id, [(ids, text)])
                if rendering.bos is not None and (not ids or ids[0] != rendering.bos):
                    ids, spans = [rendering.bos, *ids], _zeros_around(spans, 1)
            if rendering.max_tokens is not None and len(ids) >= rendering.max_tokens:
                raise UserError(f"{d.doc_id}: the prompt has {len(ids)} tokens; --max-length {rendering.max_tokens} "
                                "leaves no room for a response (raise --max-length, or --on-error skip)")
        except UserError as e:
            refused(e)
            continue
        except Exception as e:  # the template refused the conversation (its own raise_exception)
            from softlabels.labeler.plan import _first_line, _template_error

            if not _template_error(e):
                raise
            refused(UserError(f"{d.doc_id}: the chat template refused it ({_first_line(e)})"))
            continue
        out.append((d.doc_id, np.asarray(ids, np.int32), None, spans))
    return out


def prompt_sequences(docs: Iterable[tuple], samples: int, limit: int | None = None,
                     counts: PlanCounts | None = None) -> Iterator[Sequence]:
    """Each prompt ``samples`` times, in corpus order (``limit``: at most that many sequences)."""
    n = 0
    for doc_id, ids, _mask, *more in docs:
        for j in range(samples):
            yield Sequence(f"{doc_id}#{j}", ids, spans=more[0] if more else None, sample=j)
            n += 1
            if limit is not None and n >= limit:
                return


def complete_unit(model: Any, unit: UnitInput, job: GenerationJob) -> UnitInput:
    """The unit's prompts with their responses (see the module doc); spans extended by the responses' bytes."""
    if unit.samples is None:
        raise ValueError("complete_unit takes a unit of prompts (UnitInput.samples)")
    prompts = list(unit.input_ids)
    keys = [row_seed(job.settings.seed, src.rpartition("#")[0], j) for src, j in zip(unit.sources, unit.samples)]
    budgets = [min(job.settings.max_new_tokens, job.max_length - len(p)) for p in prompts]
    if min(budgets) < 1:
        raise ValueError("a prompt longer than max_length reached a generator (the plan refuses those)")
    responses: list[Response] = sample_responses(model, prompts, keys, budgets, job.settings, job.stops, job.vocab,
                                                 job.pad_id, job.batch_tokens)
    ids, trained, spans, logprobs = [], [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        full = np.concatenate([np.asarray(p, np.int32), r.ids]).astype(np.int32)
        mask = np.zeros(len(full), bool)
        mask[len(p) - 1:len(full) - 1] = True  # position t predicts token t + 1: the response's tokens
        ids.append(full)
        trained.append(mask)
        logprobs.append(r.logprobs.astype(np.float32))
        if unit.spans is not None:
            if job.span_lengths is None:
                raise ValueError("a unit with spans needs the tokenizer's byte lengths to extend them")
            spans.append(np.concatenate([unit.spans[i], job.span_lengths[r.ids]]).astype(np.int64))
    from softlabels.common.crash import crash_point

    crash_point("labeler.generated")  # the unit's responses written, none of them labeled yet
    return replace(unit, input_ids=tuple(ids), trained=tuple(trained), spans=tuple(spans) if unit.spans is not None else None,
                   sampler_logprob=tuple(logprobs))


class GeneratorActor:
    """A student (or any causal LM sharing the teacher's tokenizer) that writes responses; placed like a teacher
    replica (:mod:`labeler.replicas`), one beside each. Plain class; the pipeline wraps it with ``ray.remote``."""

    def __init__(self, device: str, dtype: str, threads: int | None) -> None:
        self.device, self.dtype, self.threads = device, dtype, threads
        self.model: Any = None
        self.loaded: tuple[str, str] | None = None  # (directory, weights sha256) of the model loaded

    def load(self, which: tuple[str, str]) -> bool:
        """Load the generator ``(directory, weights sha256)``, unless it is the one loaded (a kept actor serves the
        next run's generator too: the next round's student)."""
        if self.loaded != which:
            import torch
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            from softlabels.common.malloc import keep_freed_memory

            keep_freed_memory()
            if self.threads:
                torch.set_num_threads(self.threads)
            hf_logging.disable_progress_bar()
            self.model = None
            self.model = AutoModelForCausalLM.from_pretrained(which[0], dtype=getattr(torch, self.dtype))
            self.model.to(torch.device(self.device)).eval()
            self.loaded = which
        return True

    def generate(self, unit: UnitInput, job: GenerationJob) -> UnitInput:
        self.load(job.model)
        return complete_unit(self.model, unit, job)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass
class Generation:
    """A run's generators (one per teacher replica, on its node: the replicas themselves for ``teacher``), what
    they are told, and the manifest's record of it."""

    actors: list[Any]
    job: GenerationJob
    record: dict[str, Any]
    name: str  # for the summary: "the teacher" or the generator's directory


def start_generators(ray: Any, cfg: Any, tokenizer: Any, rendering: Rendering, replicas: Any) -> Generation:
    """Check the generator (one line for each refusal) and start it beside each teacher replica."""
    from softlabels.common.generate import stop_ids

    settings = cfg.generation
    chat = rendering.format == "chat"
    stops = tuple(stop_ids(tokenizer, rendering.chat_template if chat else None))
    if not stops:
        raise UserError("--generate-with: the teacher's tokenizer has no EOS token and no end-of-turn token, so a "
                        "response could only end at --max-new-tokens")
    spec = cfg.generate_with.strip()
    if spec == "teacher":
        actors, name, weights = replicas.actors, "the teacher", None
    else:
        weights = _check_generator(spec, tokenizer, chat)
        actors, name = _generator_actors(ray, replicas), spec
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    job = GenerationJob(settings, stops, cfg.max_length, len(tokenizer), int(pad), cfg.batch_tokens,
                        None if rendering.spans is None else rendering.spans.lengths,
                        None if weights is None else (str(Path(spec).resolve()), weights))
    record = {"generator": {"id": spec, "weights_sha256": weights}, **settings.record(),
              "stop_ids": ",".join(str(i) for i in stops)}
    return Generation(actors, job, record, name)


# With SOFTLABELS_KEEP_TEACHERS (labeler.replicas), generator actors stay up between runs of one process too, and the
# next run's generator loads into them (rounds: each round's student generates the next round's responses).
_KEPT: dict[str, list[Any]] = {}


def _generator_actors(ray: Any, replicas: Any) -> list[Any]:
    """One generator actor beside each teacher replica: kept ones when they are alive, else started."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from softlabels.labeler.replicas import _keep_count

    nodes = replicas.nodes()
    key = repr((replicas.device, replicas.dtype, replicas.threads, nodes, ray.get_runtime_context().gcs_address))
    kept = _KEPT.pop(key, None)
    if kept is not None:
        try:
            ray.get([a.node.remote() for a in kept], timeout=60)
            _KEPT[key] = kept
            return kept
        except Exception:  # one died since: start afresh
            release_generators(ray, kept)
    gpu = replicas.device.startswith("cuda")
    cls = ray.remote(max_restarts=3, max_task_retries=3)(GeneratorActor)
    # on CPU no CPU of its own in Ray's accounting: it and the teacher replica beside it take turns on a unit (the
    # teacher labels what it wrote), and a 2-core node must keep room for the read tasks and writers beside them
    actors = [cls.options(num_gpus=1 if gpu else 0, num_cpus=1 if gpu else 0,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))
              .remote(replicas.device, replicas.dtype, replicas.threads) for node in nodes]
    if _keep_count():
        while _KEPT:
            release_generators(ray, _KEPT.pop(next(iter(_KEPT))))
        _KEPT[key] = actors
    return actors


def release_generators(ray: Any, actors: list[Any] | None = None) -> None:
    """Kill ``actors``, or every kept generator actor (before Ray shuts down)."""
    from softlabels.labeler.replicas import _release

    for group in [actors] if actors is not None else [_KEPT.pop(k) for k in list(_KEPT)]:
        _release(ray, group)


def _check_generator(path: str, tokenizer: Any, chat: bool) -> str:
    """A generator directory: a causal LM with the teacher's tokenizer (and a chat template for chat prompts);
    returns its weights' sha256."""
    import os

    from softlabels.labeler.teacher import weights_sha256
    from softlabels.schemas import tokenizer_fingerprint

    where = f"--generate-with {path}"
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{where}: not a model directory (no config.json); give 'teacher' or a directory saved by "
                        "`softlabels train` (or any HF causal LM)")
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        raise UserError(f"{where}: the directory holds no weights (*.safetensors)")
    from transformers import AutoTokenizer

    try:
        gen_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # no tokenizer files, or unreadable ones
        raise UserError(f"{where}: its tokenizer cannot be loaded ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from e
    fp, want = tokenizer_fingerprint(gen_tok), tokenizer_fingerprint(tokenizer)
    if fp != want:
        raise UserError(f"{where}: its tokenizer ({fp[:19]}, {len(gen_tok)} tokens) differs from the teacher's ({want[:19]}, "
                        f"{len(tokenizer)} tokens); the generator must write the teacher's token ids (a student with "
                        "another tokenizer cannot generate for this teacher's labels)")
    if chat:
        from softlabels.labeler.chat import tokenizer_template

        if not tokenizer_template(gen_tok):
            raise UserError(f"{where}: the prompts are conversations but the generator's tokenizer has no chat template "
                            "(it was not trained on conversations); give a chat student, or plain prompts")
    return weights_sha256(path)
