"""peftbench: parameter-efficient fine-tuning of pre-trained vision transformers, benchmarked honestly.

Importing peftbench registers the embedded backbone ``vit_micro`` as a timm model.
"""

from peftbench import backbones  # noqa: F401 - registers timm's "vit_micro"

__version__ = "0.1.0"
