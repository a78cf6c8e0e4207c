"""The trainer service: LoRA fine-tuning jobs on uploaded chat datasets, evaluation, adapter registry."""
