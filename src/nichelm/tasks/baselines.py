"""Baselines for classification tasks, scored by the task's own metrics on the same split.

A small pre-trained model is only worth its cost if it beats these:
  - majority: always the most frequent training label;
  - tfidf_logreg: TF-IDF of word 1-2-grams and character 2-5-grams (within words: robust to OCR
    noise) and a logistic regression (scikit-learn); C is chosen on the val split when one is given
    (the best macro-F1), else 1.
Both return the task's metrics dict (accuracy, macro-F1, confusion, Spearman for ordered labels).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from nichelm.tasks.classification import ClassificationTask

C_GRID = (0.25, 1.0, 4.0, 16.0)


def majority(task: ClassificationTask, train_labels: Sequence[str], test_labels: Sequence[str],
             test_values: Sequence[float] | None = None) -> dict:
    """The most frequent training label for every test example (ties: the earlier label of the task)."""
    counts = Counter(train_labels)
    best = min(task.labels, key=lambda label: (-counts[label], task.labels.index(label)))
    return {**task.metrics([best] * len(test_labels), test_labels, values=test_values), "label": best}


def tfidf_logreg(task: ClassificationTask, train: tuple[Sequence[str], Sequence[str]],
                 test: tuple[Sequence[str], Sequence[str]], test_values: Sequence[float] | None = None,
                 val: tuple[Sequence[str], Sequence[str]] | None = None, seed: int = 0) -> dict:
    """TF-IDF + logistic regression trained on (texts, labels) `train`, scored on `test`."""
    predict, c = fit_tfidf_logreg(task, train, val, seed)
    return {**task.metrics(predict(test[0]), test[1], values=test_values), "C": c}


def fit_tfidf_logreg(task: ClassificationTask, train, val=None, seed: int = 0):
    """(predict, C): tfidf_logreg's classifier as a function texts -> labels, and the C it chose."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    def fit(c: float):
        features = make_union(
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, max_features=200_000))
        model = make_pipeline(features, LogisticRegression(C=c, max_iter=2000, random_state=seed))
        model.fit(list(train[0]), list(train[1]))
        return lambda texts: [str(p) for p in model.predict(list(texts))] if len(texts) else []

    if val is None or not len(val[0]):
        return fit(1.0), 1.0
    scored = []
    for c in C_GRID:
        predict = fit(c)
        scored.append((task.metrics(predict(val[0]), val[1])["macro_f1"], -c, predict))
    f1, neg_c, predict = max(scored, key=lambda s: s[:2])          # ties: the smaller C (more regularised)
    return predict, -neg_c
