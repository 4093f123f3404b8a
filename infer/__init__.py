"""phonetune's inference stage: a training checkpoint -> a model folder plain `transformers` loads
(`export`, with ONNX and a model card), and what users do with a model: `evaluate` (phone error
rate, zero-shot) and `transcribe`. It reads data/ and train/'s checkpoints (train/checkpoint.py);
training never imports it."""
