"""Pre-training of the embedded backbone ``vit_micro`` on synthetic fractals: ``python -m peftbench.pretrain``."""
