"""Reading and writing scenes: 3DGS PLY files and safetensors checkpoints."""
