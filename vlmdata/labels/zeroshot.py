"""Zero-shot classification of unit CLIP image embeddings against the taxonomy's text
embeddings: one matrix product, a softmax at the model's logit scale, and top-k, per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """The labels of a chunk of ``n`` images, as indices into the taxonomy (numpy arrays)."""

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
    """Labels image embeddings with the descriptions of a taxonomy and their categories."""

    def __init__(
        self, labels: LabelEmbeddings, taxonomy: Taxonomy, top_k: int, device: str
    ) -> None:
        self.descriptions = list(taxonomy.descriptions)
        self.categories = list(taxonomy.category_names)
        self.description_category = np.array(taxonomy.category_ids, dtype=np.int64)
        self.text = labels.embeddings.to(device, torch.float32)
        self.logit_scale = labels.logit_scale
        # [D, C] one-hot: summing probabilities per category is one small matrix product.
        self.membership = F.one_hot(
            torch.from_numpy(self.description_category), len(self.categories)
        ).to(device, torch.float32)
        self.top_k = top_k
        self.device = device
        self._description_names = pa.array(self.descriptions, pa.string())
        self._category_names = pa.array(self.categories, pa.string())

    def predict(self, embeds: torch.Tensor) -> Predictions:
        """Label ``embeds`` ``[n, E]`` (any float dtype, any device)."""
        with torch.inference_mode():
            images = F.normalize(embeds.to(self.device, torch.float32), dim=-1)
            cosines = images @ self.text.T
            probabilities = torch.softmax(cosines * self.logit_scale, dim=1)
            top_probabilities, top = probabilities.topk(self.top_k, dim=1)  # sorted
            cosine = cosines.gather(1, top[:, :1]).squeeze(1)
            category_probability, category = (probabilities @ self.membership).max(dim=1)
        return Predictions(
            cosine=cosine.cpu().numpy(),
            top_category=category.cpu().numpy(),
            top_category_probability=category_probability.cpu().numpy(),
            top_k=top.cpu().numpy(),
            top_k_probabilities=top_probabilities.cpu().numpy(),
        )

    def table(self, keys: Sequence[str], first_row: int, predictions: Predictions) -> pa.Table:
        """The parquet rows of a chunk whose first row is ``first_row`` of its ``.h5``; the
        strings are taken from the taxonomy by index (in Arrow, not row by row in Python)."""
        n, k = predictions.top_k.shape
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        names, categories = self._description_names, self._category_names
        columns = [
            pa.array(keys, pa.string()),
            pa.array(np.arange(first_row, first_row + n, dtype=np.int32)),
            names.take(predictions.best),
            categories.take(self.description_category[predictions.best]),
            pa.array(predictions.cosine),
            pa.array(predictions.probability),
            categories.take(predictions.top_category),
            pa.array(predictions.top_category_probability),
            pa.ListArray.from_arrays(offsets, names.take(predictions.top_k.reshape(-1))),
            pa.ListArray.from_arrays(
                offsets, pa.array(predictions.top_k_probabilities.reshape(-1))
            ),
        ]
        return pa.Table.from_arrays(columns, schema=LABEL_SCHEMA)
