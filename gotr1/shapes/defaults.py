"""What `--preset shapes` sets under YAML and flags, per command: plain values, importable without torch (the CLI
shows them in `--help`)."""

# Full fine-tuning of the 1M-parameter LM (LoRA is for GRPO); 3000 steps of 32 = ~10 epochs of the split.
SFT_DEFAULTS = {"use_lora": False, "per_device_train_batch_size": 32, "max_steps": 3000, "learning_rate": 2e-3,
                "warmup_steps": 100, "weight_decay": 0.01, "save_steps": 500, "logging_steps": 10,
                "output_dir": "runs/shapes-sft"}
# cfg_weight 1: images are sampled from the very distribution the GRPO loss differentiates (exactly on-policy),
# and the SFT model never learned an unconditional branch. Chains are ~45 tokens; 96 leaves room to ramble.
SAMPLING_DEFAULTS = {"cfg_weight": 1.0, "max_reasoning_tokens": 96}
GRPO_DEFAULTS = {**SAMPLING_DEFAULTS, "judge": "shapes", "num_generations": 8, "prompts_per_step": 4,
                 "max_steps": 500, "learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32, "beta": 0.0,
                 "loss_type": "dapo", "lr_scheduler_type": "constant", "save_steps": 20, "sample_steps": 20,
                 "output_dir": "runs/shapes-grpo"}
