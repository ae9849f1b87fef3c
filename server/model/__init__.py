"""The model on the device: one batched forward per step (runner, decoder, attention), sampling, quantization."""
