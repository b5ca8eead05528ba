"""torch.autograd.gradcheck of the reference in fp64 (it is the ground truth, so its gradients must be right)."""
import pytest
import torch

from cases import make_case
from grpo_kernels import reference as R

# CISPO and the bias-corrected KL stop the gradient on purpose (their gradient is not the
# derivative of the loss value), so gradcheck runs with the KL correction off and CISPO is
# checked against its closed-form gradient below.
OPTIONS = ["grpo", "dapo_num_items", "sapo", "gspo", "gspo_token", "k1", "k2", "k3_clamped", "temperature",
           "entropy_bonus", "entropy_mask_bonus", "is_sequence_truncate", "per_token_adv", "everything",
           "log_ratio_clamp", "gspo_clamp", "gspo_token_clamp", "is_weights"]


@pytest.mark.parametrize("option", OPTIONS)
def test_reference_gradcheck(option):
    case = make_case(option, b=3, t=4, v=6, dtype=torch.float64, seed=21)
    case.config = case.config.replace(use_bias_correction_kl=False)
    case.logits = case.logits.masked_fill(torch.isinf(case.logits), -30.0)  # finite differences need finite inputs
    as64 = lambda x: None if x is None else x.double()  # noqa: E731

    def loss(logits):
        terms, _, _ = R.grpo_loss(logits, case.ids, case.advantages.double(), mask=case.mask,
                                  old_logps=as64(case.old_logps), ref_logps=as64(case.ref_logps),
                                  sampling_logps=as64(case.sampling_logps), is_weights=as64(case.is_weights),
                                  num_items_in_batch=case.num_items_in_batch, config=case.config)
        return terms.loss

    assert torch.autograd.gradcheck(loss, (case.logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_logprobs_entropy_gradcheck_with_neg_inf():
    logits = torch.randn(3, 7, dtype=torch.float64)
    logits[:, 2] = float("-inf")
    ids = torch.tensor([0, 3, 6])

    def f(x):
        logp, ent = R.logprobs_and_entropy(torch.cat([x[:, :2], logits[:, 2:3], x[:, 3:]], 1), ids, 0.8)
        return logp.sum() + 0.3 * ent.sum()

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),))


def test_cispo_gradient_is_the_stop_gradient_formula():
    from grpo_kernels import GRPOLossConfig

    logp = torch.randn(2, 5, dtype=torch.float64).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(2, 5, dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    cfg = GRPOLossConfig(loss_type="cispo", epsilon_high=1.1)
    R.policy_objective(logp, logp.detach(), adv, mask, cfg, old_logp=old).loss.backward()
    rho = torch.exp(logp.detach() - old)
    expected = -rho.clamp(max=1.1) * adv[:, None] / 10  # token-mean over 10 tokens
    assert torch.allclose(logp.grad, expected, rtol=1e-12, atol=0)
