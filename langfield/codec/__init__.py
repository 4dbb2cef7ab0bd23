"""Language codecs behind one interface (:mod:`langfield.codec.base`): the scene autoencoder
(LangSplat) today; a sparse codebook (LangSplatV2) plugs in the same way."""

from langfield.codec.base import (CODECS, CodecError, LanguageCodec, codec_class, codec_file, fit_codec, load_codec,
                                  masked_l1_level)

__all__ = ["LanguageCodec", "CODECS", "CodecError", "codec_class", "codec_file", "load_codec", "fit_codec",
           "masked_l1_level"]
