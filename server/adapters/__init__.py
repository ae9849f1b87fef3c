"""PEFT adapters: load and validate from disk, keep resident on the device, apply in the base model's layers."""
