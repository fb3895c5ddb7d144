from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global torch RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits in three stratified splits (train 1,077 / val 270 / test 450 rows)."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.2, random_state=0, stratify=y_rest)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


@pytest.fixture(scope="session")
def forest(digits: dict[str, tuple[np.ndarray, np.ndarray]]) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=30, random_state=0, n_jobs=1).fit(*digits["train"])
