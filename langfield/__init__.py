"""langfield: 3D and 4D language fields with Gaussian splatting."""

__version__ = "0.1.0"
