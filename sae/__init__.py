"""saekit: cache MLP activations, train sparse autoencoders, label and browse their features."""

__version__ = "0.1.0"
