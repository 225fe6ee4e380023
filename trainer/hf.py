"""Using the label set from Hugging Face ``transformers.Trainer``.

``DistillationTrainer`` is the small ``compute_loss`` subclass: feed it a
:class:`trainer.data.LabelDataset` and :func:`trainer.data.collate`, and it
trains with any of our losses (``tail-kl`` by default). See ``docs/trainer.md``.
"""

from __future__ import annotations

from typing import Any

from softlabels.schemas.errors import UserError
from softlabels.trainer.config import CHUNK_DISTANCES, DEFAULT_CHUNK_DISTANCE
from softlabels.trainer.losses import LOSSES, chunked_loss
from softlabels.trainer.data import model_inputs
from transformers import Trainer


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss is offline KD from stored soft labels."""

    def __init__(self, *args: Any, loss: str = "tail-kl", alpha: float = 1.0, temperature: float = 1.0,
                 head_chunk: int = 2048, chunk_weight: float = 0.0, chunk_distance: str = DEFAULT_CHUNK_DISTANCE,
                 **kwargs: Any) -> None:
        if loss not in LOSSES:
            raise UserError(f"loss must be one of {LOSSES}, got {loss!r}")
        super().__init__(*args, **kwargs)
        # Our batches carry label columns the model's forward() does not take: keep them.
        self.args.remove_unused_columns = False
        if chunk_distance not in CHUNK_DISTANCES:
            raise UserError(f"chunk_distance must be one of {CHUNK_DISTANCES}, got {chunk_distance!r}")
        self.kd = dict(kind=loss, alpha=alpha, temperature=temperature, chunk=head_chunk, chunk_weight=chunk_weight,
                       chunk_distance=chunk_distance)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inner = model.module if hasattr(model, "module") else model  # unwrap DDP/DataParallel
        hidden = inner.get_decoder()(**model_inputs(inputs, inner)).last_hidden_state  # packed rows: block masks
        loss, _ = chunked_loss(hidden, inner.get_output_embeddings(), self.kd["kind"], inputs,
                               self.kd["temperature"], self.kd["alpha"], self.kd["chunk"], self.kd["chunk_weight"],
                               chunk_distance=self.kd["chunk_distance"])
        return (loss, {"loss": loss}) if return_outputs else loss
