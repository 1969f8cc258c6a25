"""medtune: train, evaluate and serve biomedical multimodal assistants."""

__version__ = "0.1.0"
