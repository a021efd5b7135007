"""Native pretraining: one generic loop (:mod:`upstreams.pretrain.loop`) and four objectives (APC, CPC,
wav2vec 2.0, HuBERT), each writing checkpoints in the format the upstream loaders read."""
