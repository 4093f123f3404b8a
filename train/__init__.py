"""phonetune's training stage: a prepared dataset -> a CTC fine-tuned wav2vec 2.0, in checkpoints.

loop.py        `phonetune train`: set up, run the steps (the training step, dev evaluation), finish
batching.py    the clips that train, the duration-bucketed sampler, collate, each step's batches
model.py       building/loading Wav2Vec2ForCTC and the training wrapper (CTCModel)
parallel.py    one process, DDP, FSDP 2, DeepSpeed ZeRO-2: the only module that tells them apart
resume.py      saving a run and resuming it
checkpoint.py  the run directory and checkpoints on disk; choosing and reading a checkpoint
report.py      metrics.jsonl, wandb/TensorBoard, the console
config.py, schedule.py, run_dir.py, stop.py   config; optimizer and LR; the run lock; signals
"""
