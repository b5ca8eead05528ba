"""Drop-in integrations: `grpo_kernels.integrations.trl` (TRL's GRPOTrainer) and
`grpo_kernels.integrations.verl` (verl's policy-loss registry, its fused `kl_loss` and the
fused-linear log-prob patch; `verl_plugin` is the `verl.plugins` entry point). Nothing in
grpo_kernels imports them, so importing grpo_kernels never requires TRL or verl."""
