"""Zero-shot classification of unit CLIP image embeddings against the taxonomy's text
embeddings: one matrix product, a softmax at the model's logit scale, and top-k, per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from vlmdata.labels.taxonomy import Taxonomy
from vlmdata.labels.text import LabelEmbeddings

LABEL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("row", pa.int32()),  # index in the feature shard NNNNN.h5
        ("description", pa.string()),  # the best description
        ("category", pa.string()),  # the best description's category
        ("cosine", pa.float32()),  # between the image and the best description
        ("probability", pa.float32()),  # the best description's, softmax over descriptions
        ("top_category", pa.string()),  # the category with the most summed probability
        ("top_category_probability", pa.float32()),
        ("top_k_descriptions", pa.list_(pa.string())),  # most probable first
        ("top_k_probabilities", pa.list_(pa.float32())),
    ]
)


@dataclass
class Predictions:
    """The labels of a chunk of ``n`` images, as indices into the taxonomy (numpy arrays);
    the rows of an image that is not ``labelled`` hold no meaning."""

    labelled: np.ndarray  # [n] bool: the embedding is finite
    cosine: np.ndarray  # [n] float32
    top_category: np.ndarray  # [n] category index
    top_category_probability: np.ndarray  # [n] float32
    top_k: np.ndarray  # [n, k] description indices, most probable first
    top_k_probabilities: np.ndarray  # [n, k] float32, most probable first

    @property
    def best(self) -> np.ndarray:
        """[n] the most probable description of each image."""
        return self.top_k[:, 0]

    @property
    def probability(self) -> np.ndarray:
        """[n] the best description's probability."""
        return np.ascontiguousarray(self.top_k_probabilities[:, 0])


class ZeroShotClassifier:
    """Labels image embeddings with the descriptions of a taxonomy and their categories.

    One thread at a time: :meth:`predict` reuses its work tensors from call to call.
    """

    def __init__(
        self, labels: LabelEmbeddings, taxonomy: Taxonomy, top_k: int, device: str
    ) -> None:
        self.taxonomy = taxonomy
        self.text = labels.embeddings.to(device, torch.float32)
        self.logit_scale = labels.logit_scale
        # For each description, its category's index: the table takes category names by it.
        self._category_of = np.array(taxonomy.category_ids, dtype=np.int64)
        # [D, C] one-hot: summing probabilities per category is one small matrix product.
        self.membership = F.one_hot(
            torch.from_numpy(self._category_of), len(taxonomy.category_names)
        ).to(device, torch.float32)
        self.top_k = top_k
        self.device = device
        self._description_names = pa.array(taxonomy.descriptions, pa.string())
        self._category_names = pa.array(taxonomy.category_names, pa.string())
        self._work: dict[str, torch.Tensor] = {}

    def predict(self, embeds: torch.Tensor) -> Predictions:
        """Label ``embeds`` ``[n, E]`` (any float dtype, any device)."""
        n, (d, e) = len(embeds), self.text.shape
        with torch.inference_mode():
            images = self._work_tensor("images", n, e).copy_(embeds)  # float32, on the device
            norms = torch.linalg.vector_norm(images, dim=1, keepdim=True)
            # A NaN or inf embedding (fp16 overflow, a damaged chunk) has no label: its norm
            # is not finite (a check of [n] norms, not [n, E] values); the row is zeroed so the
            # math stays finite, and left unlabelled by `labelled`.
            labelled = torch.isfinite(norms[:, 0])
            if not labelled.all():
                images.masked_fill_(~labelled[:, None], 0.0)
                norms.masked_fill_(~labelled[:, None], 1.0)
            images.div_(norms.clamp_min_(1e-12))
            cosines = torch.mm(images, self.text.T, out=self._work_tensor("cosines", n, d))
            logits = torch.mul(cosines, self.logit_scale, out=self._work_tensor("logits", n, d))
            probabilities = torch.softmax(logits, 1, out=self._work_tensor("probabilities", n, d))
            top_probabilities, top = probabilities.topk(self.top_k, dim=1)  # sorted
            cosine = cosines.gather(1, top[:, :1]).squeeze(1)
            category_probability, category = (probabilities @ self.membership).max(dim=1)
        return Predictions(
            labelled=labelled.cpu().numpy(),
            cosine=cosine.cpu().numpy(),
            top_category=category.cpu().numpy(),
            top_category_probability=category_probability.cpu().numpy(),
            top_k=top.cpu().numpy(),
            top_k_probabilities=top_probabilities.cpu().numpy(),
        )

    def _work_tensor(self, name: str, rows: int, columns: int) -> torch.Tensor:
        """A float32 ``[rows, columns]`` tensor on the device, the same memory call after call.
        (Fresh chunk-sized tensors leave freed ones in glibc's heap, between smaller blocks it
        cannot give back: the process grew with the run, by ~300 MB over a million rows.)"""
        tensor = self._work.get(name)
        if tensor is None or len(tensor) < rows:
            tensor = self._work[name] = torch.empty(rows, columns, device=self.device)
        return tensor[:rows]

    def table(self, keys: pa.Array, first_row: int, predictions: Predictions) -> pa.Table:
        """The parquet rows of a chunk whose first row is ``first_row`` of its ``.h5`` and whose
        keys are ``keys`` (strings); the label strings are taken from the taxonomy by index (in
        Arrow, not row by row in Python)."""
        n, k = predictions.top_k.shape
        # An unlabelled image gets nulls, never a made-up label.
        missing = None if predictions.labelled.all() else ~predictions.labelled
        best = pa.array(predictions.best, mask=missing)
        # A null list is also an empty one: older pyarrow cannot write a null of length k.
        lengths = np.where(predictions.labelled, k, 0)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        names, categories = self._description_names, self._category_names

        def column(values: np.ndarray) -> pa.Array:
            return pa.array(values, mask=missing)

        def top_k(values: np.ndarray, as_array: Callable[[np.ndarray], pa.Array]) -> pa.Array:
            return pa.ListArray.from_arrays(
                offsets, as_array(values[predictions.labelled].reshape(-1)),
                mask=None if missing is None else pa.array(missing),
            )  # fmt: skip

        columns = [
            keys,
            pa.array(np.arange(first_row, first_row + n, dtype=np.int32)),
            names.take(best),
            categories.take(column(self._category_of[predictions.best])),
            column(predictions.cosine),
            column(predictions.probability),
            categories.take(column(predictions.top_category)),
            column(predictions.top_category_probability),
            top_k(predictions.top_k, names.take),
            top_k(predictions.top_k_probabilities, pa.array),
        ]
        return pa.Table.from_arrays(columns, schema=LABEL_SCHEMA)
