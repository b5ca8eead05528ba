"""Drop-in integrations: `grpo_kernels.integrations.trl` (TRL's GRPOTrainer) and
`grpo_kernels.integrations.verl` (verl's policy-loss registry). Each imports its framework
lazily, so importing grpo_kernels never requires TRL or verl."""
