"""Fine-tuning: one Accelerate loop (loop.py); the prior and the decoder supply a loss."""
