"""`backend="torch"`'s objective op: the per-token GRPO objective of docs/math.md on packed (N,)
tokens, in PyTorch, for any device and dtype (fp64 in, fp64 out).

Sequences are found through cu_seqlens: each row's sequence index comes from a searchsorted,
sequence sums from index_add, so nothing is read on the host and nothing is padded. The
gradients w.r.t. logp and entropy come from autograd over this pass's rows; the outputs are
the ones the Triton and C++ kernels write (objective_inputs.PreparedObjective), so one `finish`
serves every backend. reference.py, written on padded tensors, is the independent oracle.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import objective_inputs as io

# TRL's clamp of VESPO's log weights: [log 1e-8, 20].
VESPO_LOG_MIN, VESPO_LOG_MAX = math.log(1e-8), 20.0
# Taylor coefficients 1/k!, k = 2..18, of e^x − x − 1: full fp64 precision for |x| < 1.
K3_TAYLOR = [1.0 / math.factorial(k) for k in range(2, 19)]


def _k3(x: torch.Tensor) -> torch.Tensor:
    """e^x − x − 1 without cancellation: Horner's rule on the series below |x| = 1, expm1(x) − x above."""
    near = x.abs() < 1
    t = torch.where(near, x, 0)
    acc = torch.zeros_like(x)
    for coef in reversed(K3_TAYLOR):
        acc = acc * t + coef
    return torch.where(near, acc * t * t, torch.expm1(x) - x)


def _kl(logp, ref, cfg):
    """The k1/k2/k3 estimate of KL(π‖π_ref) per token, x = ref − logp, optionally clamped."""
    x = ref - logp
    if cfg.kl_kind == "k1":
        value = -x
    elif cfg.kl_kind == "k2":
        value = 0.5 * x * x
    else:
        value = _k3(x.clamp(-20.0, 20.0) if cfg.kl_clamp is not None else x)
    return value if cfg.kl_clamp is None else value.clamp(-cfg.kl_clamp, cfg.kl_clamp)


def _is_clip(w, cfg):
    """A rollout IS weight truncated to [is_clip_min, is_clip_max] (*_truncate) or zeroed outside it."""
    lo = -math.inf if cfg.is_clip_min is None else cfg.is_clip_min
    hi = math.inf if cfg.is_clip_max is None else cfg.is_clip_max
    if cfg.is_correction.endswith("truncate"):
        return w.clamp(lo, hi)
    return torch.where((w < lo) | (w > hi), 0, w)


def _vespo_log(w):
    return torch.log(w).clamp(VESPO_LOG_MIN, VESPO_LOG_MAX)


class _Pass:
    """The rows [lo, hi) of one objective pass, with their sequence indices."""

    def __init__(self, prep: io.PreparedObjective, lo: int, hi: int):
        self.prep, self.lo, self.hi = prep, lo, hi
        rows = torch.arange(lo, hi, device=prep.logp.device)
        self.seq = torch.searchsorted(prep.cu_seqlens[1:], rows, right=True).clamp(max=max(prep.num_sequences - 1, 0))
        self.mask = prep.mask[lo:hi].bool()

    def rows(self, x):
        return None if x is None else x[self.lo:self.hi]

    def per_sequence_sum(self, x, wide: bool = False):
        """(B, ...) sums of the rows' values by sequence (0 where masked is the caller's job), accumulated
        in fp64 as the kernels do: an fp32 running sum over a 32k-token sequence loses ~1e-4.
        wide=True returns the fp64 sums, so that gathering them back per token also accumulates
        the gradient in fp64."""
        out = torch.zeros((self.prep.num_sequences,) + tuple(x.shape[1:]), dtype=torch.float64, device=x.device)
        out = out.index_add(0, self.seq, x.to(torch.float64))
        return out if wide else out.to(x.dtype)

    def masked(self, x):
        return torch.where(self.mask, x, 0)


def _policy_loss(rho, adv, logp_m, cfg):
    """The per-token policy term of the clip, CISPO and SAPO losses."""
    if cfg.pg_loss == "clip":
        capped = rho if cfg.delta is None else rho.clamp(max=cfg.delta)
        loss = -torch.minimum(capped * adv, rho.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
        if cfg.dual_clip is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -cfg.dual_clip * adv), loss)
        return loss
    if cfg.pg_loss == "cispo":
        return -rho.clamp(min=cfg.cispo_weight_min, max=cfg.eps_high).detach() * adv * logp_m
    temp = torch.where(adv > 0, adv.new_tensor(cfg.sapo_temperature_pos), adv.new_tensor(cfg.sapo_temperature_neg))
    return -torch.sigmoid(temp * (rho - 1)) * 4 / temp * adv


@contextlib.contextmanager
def _autograd_on():
    """Autograd recording, also inside a custom op's implementation, where the dispatcher has put
    the autograd keys in the thread's exclude set (the op's own backward is registered apart).
    The gradients taken here stay inside the op: they are its outputs g_logp and g_entropy."""
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude.remove(torch._C.DispatchKey.AutogradCPU)):
        with torch.enable_grad():
            yield


def objective_pass(prep: io.PreparedObjective, cfg, rows, seqs):
    """Fill prep's outputs for rows [rows) of sequences [seqs) (see objective_inputs)."""
    (lo, hi), (seq_lo, seq_hi) = rows, seqs
    hi = min(hi, prep.logp.numel())
    with _autograd_on():
        _objective_rows(prep, cfg, _Pass(prep, lo, max(lo, hi)), seq_lo, seq_hi)


def _objective_rows(prep, cfg, p: _Pass, seq_lo, seq_hi):
    seq, m = p.seq, p.mask
    logp = p.rows(prep.logp).detach().requires_grad_(True)
    ent = p.rows(prep.entropy).detach().requires_grad_(True)
    n_b = prep.counts.clamp(min=1)
    adv = p.rows(prep.advantages) if prep.adv_per_token else prep.advantages[seq]
    logp_m = p.masked(logp)
    old = logp.detach() if prep.old is None else p.rows(prep.old)
    log_ratio = p.masked(logp - old)

    def clamp_log(w):
        return w.clamp(min=cfg.log_ratio_min, max=cfg.log_ratio_max) if (
            cfg.log_ratio_min is not None or cfg.log_ratio_max is not None) else w

    level = cfg.importance_sampling_level
    if level == "token":
        rho = torch.exp(clamp_log(log_ratio))
    elif level == "sequence":
        rho = torch.exp(clamp_log(p.per_sequence_sum(log_ratio, wide=True) / n_b))[seq].to(logp.dtype)
    else:  # sequence_token: the value of the sequence ratio, a gradient per token
        w_b = (p.per_sequence_sum(log_ratio) / n_b).detach()
        rho = torch.exp(clamp_log(logp_m - logp_m.detach() + w_b[seq]))
    rho_value = rho.detach()

    sampling = p.rows(prep.sampling)
    is_weight = is_log_per_seq = None
    if cfg.is_correction is not None:
        log_is = p.masked(torch.nan_to_num(old - sampling, nan=0.0)).detach()
        if cfg.is_correction.startswith("sequence"):
            per_seq = _is_clip(torch.exp(p.per_sequence_sum(log_is)), cfg)
            is_weight, is_log_per_seq = per_seq[seq], _vespo_log(per_seq)
        else:
            is_weight = _is_clip(torch.exp(log_is), cfg)
    given = given_log_per_seq = None
    if prep.token_weights is not None:
        if prep.weights_per_seq:
            given, given_log_per_seq = prep.token_weights[seq], _vespo_log(prep.token_weights)
        else:
            given = p.masked(p.rows(prep.token_weights))

    phi = None
    if cfg.pg_loss == "vespo":  # the rollout IS ratios fold into the sequence weight w
        with torch.no_grad():
            log_w = p.per_sequence_sum(p.masked(log_ratio.clamp(-20.0, 20.0)))
            for token_ratio, seq_log in ((is_weight, is_log_per_seq), (given, given_log_per_seq)):
                if seq_log is not None:
                    log_w = log_w + seq_log
                elif token_ratio is not None:
                    log_w = log_w + p.per_sequence_sum(p.masked(_vespo_log(token_ratio)))
            log_w = log_w.clamp(VESPO_LOG_MIN, VESPO_LOG_MAX)
            sign_adv = adv if prep.adv_per_token else prep.advantages
            log_w_adv = log_w[seq] if prep.adv_per_token else log_w
            nonneg = sign_adv >= 0
            k = torch.where(nonneg, sign_adv.new_tensor(cfg.vespo_k_pos), sign_adv.new_tensor(cfg.vespo_k_neg))
            lam = torch.where(nonneg, sign_adv.new_tensor(cfg.vespo_lambda_pos),
                              sign_adv.new_tensor(cfg.vespo_lambda_neg)).clamp(min=1e-4)
            phi = torch.nan_to_num(torch.exp(lam + k * log_w_adv - lam * torch.exp(log_w_adv)),
                                   nan=0.0, posinf=0.0, neginf=0.0)
        loss_pg = -(phi if prep.adv_per_token else phi[seq]) * adv * logp_m
    else:
        loss_pg = _policy_loss(rho, adv, logp_m, cfg)

    if cfg.off_policy_mask_threshold is not None:
        behaviour = old if sampling is None else sampling
        seq_kl = p.per_sequence_sum(p.masked(torch.nan_to_num(behaviour - logp.detach(), nan=0.0))) / n_b
        loss_pg = loss_pg * ((adv >= 0) | (seq_kl[seq] <= cfg.off_policy_mask_threshold)).to(logp.dtype)
    keep = None if prep.keep_entropy is None else p.rows(prep.keep_entropy).bool()
    if keep is not None:
        loss_pg = loss_pg * keep.to(logp.dtype)
    if cfg.pg_loss != "vespo":
        for weight in (is_weight, given):
            if weight is not None:
                loss_pg = loss_pg * weight

    per_token, kl = loss_pg, None
    if cfg.beta != 0.0:
        kl = _kl(logp_m, p.masked(p.rows(prep.ref)), cfg)
        if cfg.use_bias_correction_kl:
            kl = kl * rho  # with ρ's gradient, as TRL
        per_token = per_token + cfg.beta * kl
    per_token = p.masked(per_token)
    scale = 1 / prep.norm[0]
    if cfg.agg_mode == "seq-mean-token-mean":
        scale = scale / n_b[seq]
    contribution = per_token * scale
    if cfg.entropy_coef != 0.0:
        effective = m if keep is None else keep
        contribution = contribution - torch.where(effective, ent, 0) * (cfg.entropy_coef / prep.ent_norm[0])
    g_logp, g_ent = torch.autograd.grad(contribution.sum(), (logp, ent), allow_unused=True)
    prep.per_token_loss[p.lo:p.hi] = per_token.detach()
    prep.g_logp[p.lo:p.hi] = 0.0 if g_logp is None else g_logp
    prep.g_entropy[p.lo:p.hi] = 0.0 if g_ent is None else g_ent

    with torch.no_grad():
        _add_partials(prep, cfg, p, contribution.detach(), ent.detach(), rho_value, adv, kl, is_weight, phi,
                      seq_lo, seq_hi)


def _add_partials(prep, cfg, p: _Pass, contribution, ent, rho_value, adv, kl, is_weight, phi, seq_lo, seq_hi):
    """Per-sequence sums of the pass's rows into prep.partials, slot by slot as the kernels write them."""
    m = p.mask
    low = (rho_value < 1 - cfg.eps_low) & (adv < 0)
    high = (rho_value > 1 + cfg.eps_high) & (adv > 0)
    ones = torch.ones_like(rho_value)
    zero_rows = torch.zeros_like(rho_value)
    # Every slot's per-token values in one (n, 12) matrix, summed by sequence in one index_add.
    per_token = torch.stack([
        contribution, ones, ent, low.to(ent.dtype), high.to(ent.dtype), (low | high).to(ent.dtype), rho_value,
        zero_rows, zero_rows if kl is None else kl.detach(), ones if is_weight is None else is_weight,
        ((rho_value > cfg.eps_high) & (adv > 0)).to(ent.dtype),
        phi if phi is not None and prep.adv_per_token else zero_rows,
    ], dim=1)
    per_token = torch.where(m.unsqueeze(1), per_token, 0)
    sums = p.per_sequence_sum(per_token, wide=True).to(prep.partials.dtype)
    if phi is not None and not prep.adv_per_token:  # one φ per sequence, each sequence whole in one pass
        owned = torch.zeros_like(phi, dtype=torch.bool)
        owned[seq_lo:seq_hi] = True
        sums[:, 11] = torch.where(owned, phi, 0)
    prep.partials[:, :per_token.shape[1]] += sums
    zero = torch.zeros(prep.num_sequences, dtype=ent.dtype, device=ent.device)
    peak = zero.scatter_reduce(0, p.seq, p.masked(rho_value), "amax", include_self=True)
    prep.partials[:, 7] = torch.maximum(prep.partials[:, 7], peak)
