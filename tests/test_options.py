"""The option table is the one source: the generated C++ header and Triton constants match it,
the Python enums agree with the config's choices, and every LossParams field reaches the kernels."""
import dataclasses
import os

import pytest

import grpo_kernels as gk
from grpo_kernels import codegen, options
from grpo_kernels.config import IMPORTANCE_SAMPLING_LEVELS, IS_CORRECTION_MODES, LOSS_AGG_MODES, POLICY_LOSSES


@pytest.mark.parametrize("path", sorted(codegen.GENERATED))
def test_generated_files_are_fresh(path):
    with open(os.path.join(codegen.repository_root(), path)) as f:
        committed = f.read()
    assert committed == codegen.GENERATED[path](), (
        f"{path} is stale: run `python -m grpo_kernels.codegen` after editing grpo_kernels/options.py")


def test_config_choices_come_from_the_table():
    assert POLICY_LOSSES == tuple(m.public for m in options.PolicyLoss)
    assert LOSS_AGG_MODES == tuple(m.public for m in options.Agg)
    assert IMPORTANCE_SAMPLING_LEVELS == tuple(m.public for m in options.Level)
    assert IS_CORRECTION_MODES == tuple(m.public for m in options.IsMode if m is not options.IsMode.NONE)


def test_params_record_is_plain_scalars():
    params = gk.GRPOLossConfig(loss_type="cispo", epsilon_high=5.0, beta=0.04, delta=None).params
    assert all(type(v) is int for v in params.ints), params.ints
    assert all(isinstance(v, float) for v in params.floats), params.floats
    assert params.pg == options.PolicyLoss.CISPO and params.kl == options.KlKind.K3
    assert params == options.LossParams.from_parts(params.ints, params.floats)
    assert hash(params) == hash(options.LossParams.from_parts(params.ints, params.floats))


def test_params_follow_every_config_field():
    """Changing any numeric config field changes the record (nothing is silently dropped)."""
    base = gk.GRPOLossConfig(loss_type="grpo", beta=0.1, delta=1.5, dual_clip=3.0, kl_clamp=2.0,
                             off_policy_mask_threshold=0.5, is_correction="token_truncate", is_clip_min=0.5,
                             log_ratio_min=-1.0, log_ratio_max=1.0, max_completion_length=8, top_entropy_quantile=0.5,
                             final_logit_softcapping=10.0)
    skip = {"loss_type", "policy_loss", "loss_agg_mode", "kl_estimator", "importance_sampling_level", "is_correction",
            "use_bias_correction_kl", "cispo_weight_min"}
    # The sampler's truncation steers the log-prob pass, not the objective: config.truncation, not params.
    truncation_fields = {"top_k": 5, "top_p": 0.8, "min_p": 0.1}
    for name, value in truncation_fields.items():
        changed = base.replace(**{name: value})
        assert changed.params == base.params and changed.truncation != base.truncation, name
    skip |= set(truncation_fields)
    for field in dataclasses.fields(base):
        name, value = field.name, getattr(base, field.name)
        if name in skip or not isinstance(value, (int, float)):
            continue
        changed = base.replace(**{name: value * 1.25 + 0.125 if name != "max_completion_length" else value + 1})
        assert changed.params != base.params, name


def test_metric_slots_line_up():
    from grpo_kernels.ops import objective_inputs as io

    assert options.NUM_SLOTS == len(options.Slot)
    assert len(io.PreparedObjective.__dataclass_fields__) == len(options.OBJECTIVE_BUFFERS) + 2
