"""CropFormer: fine-grained entity segmentation in plain PyTorch."""
__version__ = "0.1.0"
