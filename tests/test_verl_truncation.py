"""verl's actor/reference log-probs over the kept set of verl's rollout sampler (opt-in,
grpo_kernels/integrations/verl/truncation.py): the settings read from verl's rollout config, the
eager engines' `logprobs_from_logits` and the fused-linear drop-ins against the fp64 sort-based
oracle, and the worker hook that patches each worker process from its own config.

verl's engine and worker modules import peft and uvicorn, which this CPU environment lacks; where
they do not import, stand-in modules of the same names take the patches (the patches replace a
module attribute and wrap a class's __init__, which the stand-ins show as well)."""
import importlib
import sys
import warnings
from types import ModuleType, SimpleNamespace

import pytest
import torch

pytest.importorskip("verl")
from omegaconf import OmegaConf  # noqa: E402

from grpo_kernels import reference  # noqa: E402
from grpo_kernels.integrations.verl import truncation as verl_truncation  # noqa: E402
from grpo_kernels.truncation import NO_TRUNCATION, Truncation  # noqa: E402


def importable_or_stand_in(monkeypatch, name, **attributes):
    """verl's module `name`, or (where its dependencies are missing here) a stand-in with `attributes`."""
    try:
        with warnings.catch_warnings():  # ray's deprecation warnings on the way (errors under pytest)
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name)
    except ImportError:
        module = ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
        return module


@pytest.fixture
def restore_verl(monkeypatch):
    """Every attribute the patches replace, put back after the test; the eager engines' modules."""
    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as lce
    from verl.utils.torch_functional import logprobs_from_logits

    monkeypatch.setattr(torch_functional, "FusedLinearForPPO", torch_functional.FusedLinearForPPO)
    monkeypatch.setattr(lce, "linear_cross_entropy", lce.linear_cross_entropy)
    engines = [importable_or_stand_in(monkeypatch, name, logprobs_from_logits=logprobs_from_logits)
               for name in verl_truncation.ENGINE_MODULES]
    for module in engines:
        monkeypatch.setattr(module, "logprobs_from_logits", module.logprobs_from_logits)
    return engines


def test_settings_are_read_from_the_rollout_config():
    node = OmegaConf.create(dict(temperature=0.7, top_k=-1, top_p=1.0, do_sample=True))
    assert verl_truncation.rollout_truncation(node) == NO_TRUNCATION
    node = OmegaConf.create(dict(temperature=0.7, top_k=20, top_p=0.8, do_sample=True))
    assert verl_truncation.rollout_truncation(node) == Truncation(20, 0.8, 0.0)
    from verl.workers.config.rollout import SamplingConfig  # verl's dataclass form

    assert verl_truncation.rollout_truncation(SamplingConfig(top_k=5, top_p=0.9)) == Truncation(5, 0.9, 0.0)
    with pytest.raises(ValueError, match="do_sample=False samples greedily"):
        verl_truncation.rollout_truncation(SimpleNamespace(do_sample=False, top_k=-1, top_p=1.0))


SETTING = Truncation(top_k=6, top_p=0.8, min_p=0.0)


def test_eager_engine_log_probs_are_over_the_kept_set(restore_verl):
    from verl.utils.torch_functional import logprobs_from_logits

    logits = torch.randn(20, 50, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (20,))
    # Off: verl's own function and ours agree (the drop-in keeps verl's call signature).
    torch.testing.assert_close(
        verl_truncation.truncated_logprobs_from_logits(logits.float(), labels, truncation=NO_TRUNCATION),
        logprobs_from_logits(logits.float(), labels), rtol=1e-5, atol=1e-5)
    verl_truncation.patch_truncation(SETTING, backend="torch")
    expected, _ = reference.logprobs_and_entropy(logits, labels, **SETTING._asdict())
    full, _ = reference.logprobs_and_entropy(logits, labels)
    for engine in restore_verl:  # every engine calls it by keyword
        got = engine.logprobs_from_logits(logits=logits.float(), labels=labels)
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
        assert (got.double() - full).abs().max() > 0.05  # the truncation changed them


def test_fused_linear_drop_ins_are_over_the_kept_set(restore_verl):
    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as lce

    verl_truncation.patch_truncation(SETTING, backend="torch")
    hidden, weight = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64) / 2
    ids = torch.randint(0, 50, (3, 7))
    expected_logp, expected_entropy = reference.logprobs_and_entropy(hidden @ weight.T, ids, temperature=0.7,
                                                                     **SETTING._asdict())
    logp, entropy = torch_functional.FusedLinearForPPO()(hidden.float(), weight.float(), ids, temperature=0.7)
    torch.testing.assert_close(logp, expected_logp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy.float(), rtol=1e-5, atol=1e-5)
    flat_logp, _ = lce.linear_cross_entropy(hidden.float(), weight.float(), ids, 0.7)
    torch.testing.assert_close(flat_logp, expected_logp.float().flatten(), rtol=1e-5, atol=1e-5)


def test_worker_hook_patches_the_process_from_the_workers_config(restore_verl, monkeypatch):
    engine_workers = importable_or_stand_in(monkeypatch, "verl.workers.engine_workers",
                                            ActorRolloutRefWorker=type("ActorRolloutRefWorker", (), {}))
    seen = []
    monkeypatch.setattr(engine_workers.ActorRolloutRefWorker, "__init__",
                        lambda self, config, role, **kw: seen.append(role))  # verl's own: Ray, devices
    verl_truncation.install_worker_hook(backend="torch")
    verl_truncation.install_worker_hook(backend="torch")  # a second install does not wrap twice
    config = OmegaConf.create(dict(rollout=dict(temperature=1.0, top_k=6, top_p=0.8, do_sample=True)))
    worker = object.__new__(engine_workers.ActorRolloutRefWorker)
    engine_workers.ActorRolloutRefWorker.__init__(worker, config, "actor_rollout")
    assert seen == ["actor_rollout"]
    assert all(engine.logprobs_from_logits.keywords["truncation"] == SETTING for engine in restore_verl)


def test_sum_pi_squared_keeps_the_truncation():
    """With Σπ² asked for (sum_pi_squared.py's engine wrapper), the truncated drop-ins still give the
    kept set's log-probs and entropy, and Σπ² of the kept set, against the fp64 oracle."""
    from grpo_kernels.integrations.verl import fused_linear as verl_fused

    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 6, 16, generator=g), torch.randn(40, 16, generator=g) / 2
    ids = torch.randint(0, 40, (2, 6), generator=g)
    truncation = Truncation(top_k=8, top_p=0.9, min_p=0.0)
    verl_fused.SUM_PI_SQUARED.requested = True
    try:
        log_probs, entropy = verl_fused.FusedLinearForPPO(backend="torch", truncation=truncation)(
            hidden, weight, ids, temperature=0.7)
        sum_pi_sq = verl_fused.SUM_PI_SQUARED.value
    finally:
        verl_fused.SUM_PI_SQUARED.requested, verl_fused.SUM_PI_SQUARED.value = False, None
    logits = (hidden @ weight.T).double()
    want = reference.logprobs_and_entropy(logits, ids, 0.7, top_k=8, top_p=0.9, with_sum_pi_squared=True)
    for got, ref in zip((log_probs, entropy, sum_pi_sq), want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
