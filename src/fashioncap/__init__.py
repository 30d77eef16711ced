"""Fine-tune BLIP image captioners on product catalogues, tracked with DVC and MLflow."""

from pathlib import Path

__version__ = "0.1.0"

# `evaluate.load(fashioncap.EVALUATE_METRIC)`: the project's caption metrics as a Hugging Face metric
EVALUATE_METRIC = str(Path(__file__).parent / "evaluate_metric" / "fashioncap_captions.py")
