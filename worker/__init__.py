"""The worker: owns the accelerator. Prepares base models (GGUF → safetensors) and, later, runs training
processes and hosts generation. Heavy imports (torch, transformers) happen inside functions."""
