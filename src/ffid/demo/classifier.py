"""An independent judge: a scikit-learn classifier trained on the real digits only.

It never sees a generated image, so its verdict on samples measures whether the DiT draws the
digit, not whether it learned to please the judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import to_unit


@dataclass
class DigitJudge:
    """A fitted classifier and its accuracy on real digits it did not train on."""

    model: Any
    holdout_accuracy: float

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit for each image in model space (``[N, 1, 1, H, W]`` or ``[N, H, W]``)."""
        flat = to_unit(images).reshape(images.shape[0], -1).numpy()
        return torch.from_numpy(self.model.predict(flat)).long()


def fit_judge(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> DigitJudge:
    """Fit an RBF SVM on 80% of the real images; report its accuracy on the other 20%.

    The split is fixed by ``seed`` so the judge, and therefore every reported number, is
    reproducible.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    flat = to_unit(images).reshape(images.shape[0], -1).numpy()
    y = labels.numpy()
    x_train, x_test, y_train, y_test = train_test_split(flat, y, test_size=0.2, random_state=seed, stratify=y)
    clf = SVC(C=10.0, gamma="scale")
    clf.fit(x_train, y_train)
    return DigitJudge(model=clf, holdout_accuracy=float((clf.predict(x_test) == y_test).mean()))
