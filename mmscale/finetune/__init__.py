"""Fine-tuning released checkpoints: LoRA on the towers, through the pretraining loop."""
