"""Moved to :mod:`langfield.codec.autoencoder` (the scene autoencoder is one language codec);
this module keeps the old import path working."""

from langfield.codec.autoencoder import (AutoencoderConfig, SceneAutoencoder, autoencoder_loss,  # noqa: F401
                                         collect_features, fit_autoencoder, reconstruction_cosine)

__all__ = ["SceneAutoencoder", "AutoencoderConfig", "fit_autoencoder", "collect_features", "reconstruction_cosine",
           "autoencoder_loss"]
