"""phonetune's data stage, and the phone facts every stage shares.

A Common Voice release -> espeak-ng phones -> a prepared dataset (`synth`, `prepare`, `merge`),
plus what training and inference both read: audio decoding and normalisation (`audio`), the
vocabulary (`vocab`), the prepared dataset on disk (`prepared`), CTC frame rules and decoding
(`ctc`), the phone error rate (`per`) and articulatory features (`articulatory`).
"""
