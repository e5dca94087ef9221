"""Model weights: the torchvision-free ResNet-18, its export to TorchScript and the artifact manifest.

Importing this package imports nothing heavy: the API uses ``weights.manifest`` without torch.
"""
