"""The importance-ratio demonstration (benchmarks/truncation_ratios.py), test-sized: truncation-
aware log-probs leave far fewer ratios outside [0.9, 1.1] than full-vocabulary ones, for a top-p
and a top-k sampler, as the committed table claims."""
import pytest

from benchmarks.truncation_ratios import SETTINGS, measure, peaked_model


@pytest.fixture(scope="module")
def model():
    return peaked_model(256, seed=0)


@pytest.mark.parametrize("name", ["top_p=0.8", "top_k=20"])
def test_truncation_aware_ratios_stay_in_the_band(model, name):
    r = measure(SETTINGS[name], sequences=8, length=12, vocab=256, model=model)
    assert r["tokens"] == 96 and 1.0 < r["entropy"] < 4.0
    assert r["kept_mass"] < 0.95  # the sampler did truncate
    assert r["outside_full"] > 0.3
    assert r["outside_aware"] < r["outside_full"] / 5
