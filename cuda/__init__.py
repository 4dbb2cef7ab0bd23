"""Sources of langfield's native renderer (C++17 + CUDA), shipped as package data.

Installed as ``langfield.csrc``; built on first use by :mod:`langfield.render._build`.
"""
