"""Base models (load), LoRA adapters (lora) and FLOP counting (flops)."""
