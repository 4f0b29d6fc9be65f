"""The digits quality report: classifier, Fréchet distance, report.

References are independent: scikit-learn's accuracy_score for accuracies,
scipy.linalg.sqrtm and the diagonal-Gaussian closed form for the Fréchet
distance, and the exact identity d(X, X + delta) = ||delta||^2.
"""

import json

import jax
import numpy as np
import pytest
import scipy.linalg
from sklearn.metrics import accuracy_score

from jaxdiff import evaluation as ev
from jaxdiff.data.digits import load_digits_arrays


@pytest.fixture(scope="module")
def clf() -> ev.DigitClassifier:
    return ev.train_digit_classifier(seed=0)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    return load_digits_arrays("test", 32)


@pytest.fixture(scope="module")
def real_report(clf, test_split) -> dict:
    x, y = test_split
    return ev.digits_report(x, y, clf)


# ------------------------------------------------------------------ classifier


def test_classifier_reaches_high_test_accuracy(clf, test_split):
    x, y = test_split
    pred = clf.predict(x)
    assert pred.shape == (300,) and pred.dtype == np.int32
    assert clf.test_accuracy == pytest.approx(accuracy_score(y, pred))
    assert clf.test_accuracy >= 0.95
    feats = clf.features(x)
    assert feats.shape == (300, ev.FEATURE_DIM) and np.all(np.isfinite(feats))
    # uint8 input in [0, 255] reads the same digits as float input in [-1, 1].
    x_u8 = np.round((x + 1) * 127.5).astype(np.uint8)
    assert accuracy_score(pred, clf.predict(x_u8)) >= 0.99


def test_classifier_is_deterministic_and_cached(tmp_path, monkeypatch):
    a = ev.train_digit_classifier(seed=1, steps=20)
    b = ev.train_digit_classifier(seed=1, steps=20)
    c = ev.train_digit_classifier(seed=2, steps=20)
    same = jax.tree.map(np.array_equal, a.params, b.params)
    assert all(jax.tree.leaves(same))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, a.params, c.params)))

    path = tmp_path / "cache" / "digit_classifier.msgpack"
    first = ev.load_or_train(path, seed=1, steps=20)
    assert path.is_file()
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a.params, first.params)))

    def no_training(**kwargs):
        raise AssertionError("retrained although a matching cache file exists")

    monkeypatch.setattr(ev, "train_digit_classifier", no_training)
    cached = ev.load_or_train(path, seed=1, steps=20)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a.params, cached.params)))
    assert cached.test_accuracy == first.test_accuracy
    # A different recipe must not reuse the file.
    with pytest.raises(AssertionError, match="retrained"):
        ev.load_or_train(path, seed=1, steps=21)


def test_bad_images_are_refused(clf):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        clf.predict(np.full((2, 32, 32, 3), 200.0, np.float32))
    with pytest.raises(ValueError, match="shape"):
        clf.predict(np.zeros((2, 32, 32, 2), np.uint8))


# ------------------------------------------------------------------ Fréchet distance


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * covmean))


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 6
    for _ in range(3):
        mix_a, mix_b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        a = rng.normal(size=(200, d)) @ mix_a + rng.normal(size=d)
        b = rng.normal(size=(150, d)) @ mix_b + rng.normal(size=d)
        ours = ev.frechet_distance(a, b)
        assert ours == pytest.approx(_scipy_frechet(a, b), rel=1e-6)
        assert ev.frechet_distance(b, a) == pytest.approx(ours, rel=1e-9)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    var_a, var_b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    mu_a, mu_b = rng.normal(size=8), rng.normal(size=8)
    # W2^2 between diagonal Gaussians: ||mu_a - mu_b||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = ev.frechet_distance_gaussians(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_zero_for_identical_and_quadratic_in_mean_shift():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    scale = np.trace(np.cov(a, rowvar=False))
    assert 0.0 <= ev.frechet_distance(a, a) <= 1e-9 * scale
    delta = rng.normal(size=16)
    for k in (0.5, 1.0, 3.0):
        # Equal covariances: only the mean term remains.
        assert ev.frechet_distance(a, a + k * delta) == pytest.approx(
            k**2 * float(delta @ delta), rel=1e-6
        )


def test_frechet_near_singular_covariances():
    rng = np.random.default_rng(3)
    # Fewer samples than dimensions, a duplicated column and a constant one
    # (like a dead ReLU unit): both covariances are singular.
    a = rng.normal(size=(10, 20))
    a[:, 1] = a[:, 0]
    a[:, 2] = 0.0
    b = rng.normal(size=(12, 20)) * 2.0
    b[:, 2] = 0.0
    d_ab, d_ba = ev.frechet_distance(a, b), ev.frechet_distance(b, a)
    assert np.isfinite(d_ab) and d_ab > 0
    assert d_ab == pytest.approx(d_ba, rel=1e-6)
    assert 0.0 <= ev.frechet_distance(a, a) <= 1e-9 * np.trace(np.cov(a, rowvar=False))
    delta = rng.normal(size=20)
    assert ev.frechet_distance(a, a + delta) == pytest.approx(float(delta @ delta), rel=1e-6)


# ------------------------------------------------------------------ report


def test_report_on_real_test_images(clf, test_split, real_report):
    _, y = test_split
    r = real_report
    assert r["accuracy"] == pytest.approx(clf.test_accuracy)
    assert r["classifier_test_accuracy"] == clf.test_accuracy
    assert r["num_generated"] == r["num_real_test"] == r["num_real_reference"] == 300
    assert r["reference_frechet_distance"] > 0
    assert r["frechet_distance"] <= 1e-6 * r["reference_frechet_distance"]
    counts = np.bincount(y, minlength=10)
    assert [r["count_per_digit"][str(d)] for d in range(10)] == counts.tolist()
    per_digit = np.array([r["accuracy_per_digit"][str(d)] for d in range(10)])
    assert np.sum(per_digit * counts) / counts.sum() == pytest.approx(r["accuracy"])


def test_report_reference_differs_from_test_to_test(clf, real_report):
    # The reference is a genuine train-vs-test distance, computed from the
    # fixed train subset, not a copy of the test set.
    ref_x = ev.reference_train_subset(300, 32)
    test_x, _ = load_digits_arrays("test", 32)
    expected = ev.frechet_distance(clf.features(ref_x), clf.features(test_x))
    assert real_report["reference_frechet_distance"] == pytest.approx(expected, rel=1e-9)


def test_report_with_shuffled_labels_is_near_chance(clf, test_split, real_report):
    x, y = test_split
    shuffled = np.random.default_rng(0).permutation(y)
    r = ev.digits_report(x, shuffled, clf)
    assert 0.03 <= r["accuracy"] <= 0.2
    # Same images, so the same distance.
    assert r["frechet_distance"] == pytest.approx(real_report["frechet_distance"], abs=1e-9)


def test_report_on_noise_is_far_from_real(clf, real_report):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(200, 32, 32, 3), dtype=np.uint8)
    r = ev.digits_report(noise, rng.integers(0, 10, 200), clf)
    assert r["frechet_distance"] > 10 * real_report["reference_frechet_distance"]
    assert r["frechet_ratio"] > 10


def test_report_resizes_other_resolutions(clf, test_split, real_report):
    _, y = test_split
    x64, _ = load_digits_arrays("test", 64)
    r = ev.digits_report(x64, y, clf)
    assert r["accuracy"] >= clf.test_accuracy - 0.05
    assert r["frechet_distance"] < real_report["reference_frechet_distance"]


def test_report_rejects_bad_labels(clf, test_split):
    x, y = test_split
    with pytest.raises(ValueError, match="0..9"):
        ev.digits_report(x, np.where(y == 0, 10, y), clf)
    with pytest.raises(ValueError, match="labels must be"):
        ev.digits_report(x, y[:-1], clf)


def test_format_and_save_report(real_report, tmp_path):
    text = ev.format_report(real_report)
    assert f"{real_report['accuracy']:.4f}" in text
    assert f"{real_report['reference_frechet_distance']:.4f}" in text
    assert len(text.splitlines()) == 6
    path = tmp_path / "out" / "report.json"
    ev.save_report(real_report, path)
    assert json.loads(path.read_text()) == real_report
