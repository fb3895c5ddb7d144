"""Bad input gets kdistill's own exception types with a message that says what is wrong and how to fix it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.ensemble import RandomForestClassifier
from torch import nn

import kdistill
from kdistill.errors import ConfigError, DataError, LabelError, ShapeMismatchError, StudentError, TeacherError

QUICK = {"epochs": 1, "verbose": False, "report": False}


def test_nan_in_x(digits, forest) -> None:
    x, y = digits["train"][0].copy(), digits["train"][1]
    x[7, 3] = np.nan
    with pytest.raises(DataError, match=r"NaN or inf in 1 row\(s\), first at row 7") as info:
        kdistill.distill(forest, "mlp", (x, y), **QUICK)
    assert "impute" in str(info.value)


def test_inf_in_val(digits, forest) -> None:
    x = digits["val"][0].copy()
    x[0, 0] = np.inf
    with pytest.raises(DataError, match="val X has NaN or inf"):
        kdistill.distill(forest, "mlp", digits["train"], val=(x, digits["val"][1]), **QUICK)


def test_x_and_y_of_different_lengths(digits, forest) -> None:
    x, y = digits["train"]
    with pytest.raises(DataError, match=f"train X has {len(x)} rows but y has {len(x) - 1}"):
        kdistill.distill(forest, "mlp", (x, y[:-1]), **QUICK)


def test_labels_the_teacher_never_saw(digits, forest) -> None:
    x, y = digits["train"]
    y = y.copy()
    y[:3] = 42
    with pytest.raises(LabelError, match=r"labels the teacher never saw: \[42\]"):
        kdistill.distill(forest, "mlp", (x, y), **QUICK)


def test_labels_beyond_a_torch_teachers_classes() -> None:
    x = torch.randn(50, 4)
    y = torch.randint(0, 5, (50,))
    with pytest.raises(LabelError, match="labels go up to 4 but the teacher outputs 3 classes"):
        kdistill.distill(nn.Linear(4, 3), "mlp", (x, y), **QUICK)


def test_student_with_the_wrong_number_of_classes(digits, forest) -> None:
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(
        ShapeMismatchError, match=r"outputs \(2, 7\) for 2 rows, but the teacher has 10 classes"
    ) as info:
        kdistill.distill(forest, student, digits["train"], **QUICK)
    assert "output 10 logits" in str(info.value)


def test_student_that_cannot_take_the_input(digits, forest) -> None:
    with pytest.raises(StudentError, match="failed on a batch of shape"):
        kdistill.distill(forest, nn.Linear(10, 10), digits["train"], **QUICK)


def test_teacher_without_predict_proba_or_decision_function(digits) -> None:
    clusters = KMeans(n_clusters=10, n_init=1, random_state=0).fit(digits["train"][0])
    with pytest.raises(TeacherError, match="neither predict_proba nor decision_function"):
        kdistill.distill(clusters, "mlp", digits["train"], **QUICK)
    with pytest.raises(TeacherError, match="cannot use a str as a teacher"):
        kdistill.distill("forest", "mlp", digits["train"], **QUICK)


def test_unfitted_teacher(digits) -> None:
    with pytest.raises(TeacherError, match="not fitted") as info:
        kdistill.distill(RandomForestClassifier(), "mlp", digits["train"], **QUICK)
    assert "DistilledClassifier" in str(info.value)


def test_empty_data(forest) -> None:
    with pytest.raises(DataError, match="empty"):
        kdistill.distill(forest, "mlp", (np.zeros((0, 64)), np.zeros(0, dtype=int)), **QUICK)


def test_non_numeric_x(forest) -> None:
    x = np.array([["a"] * 64, ["b"] * 64])
    with pytest.raises(DataError, match="not numeric"):
        kdistill.distill(forest, "mlp", (x, [0, 1]), **QUICK)


def test_non_numeric_dataframe_column(digits, forest) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(digits["train"][0])
    frame[3] = "text"
    with pytest.raises(DataError, match=r"non-numeric columns: \['3'\]"):
        kdistill.distill(forest, "mlp", (frame, digits["train"][1]), **QUICK)


def test_unknown_student_and_method(digits, forest) -> None:
    with pytest.raises(StudentError, match=r"unknown student 'transformr'\n  hint: did you mean 'transformer'\?"):
        kdistill.distill(forest, "transformr", digits["train"], **QUICK)
    # "transformer" is registered: without a transformers teacher it needs a folder or a config, and says so
    with pytest.raises(StudentError, match="needs a teacher folder or a config with a vocab_size"):
        kdistill.distill(forest, "transformer", digits["train"], **QUICK)
    # the API validates its method through the config's model: the same error as `method: kdd` in YAML
    with pytest.raises(ConfigError, match=r"method\[0\]\.name: unknown method 'kdd'; did you mean 'kd'\?"):
        kdistill.distill(forest, "mlp", digits["train"], method="kdd", **QUICK)


def test_errors_are_also_builtin_types() -> None:
    assert issubclass(DataError, ValueError) and issubclass(TeacherError, TypeError)
