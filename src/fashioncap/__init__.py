"""Fine-tune BLIP image captioners on product catalogues, tracked with DVC and MLflow."""

__version__ = "0.1.0"
