"""phonetune's training stage: a prepared dataset -> CTC fine-tuned wav2vec 2.0 -> export."""
