"""arcstream: what a language model computes while it solves ARC tasks.

Capture activations of Flax NNX decoders on ARC prompts, stream them to a
TensorStore store and to online sparse autoencoders, and analyse the features
on the ARC grids themselves. See README.md and docs/.
"""

__version__ = "0.1.0"
