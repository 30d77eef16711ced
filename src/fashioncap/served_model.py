"""The entry file of every registered version (MLflow models-from-code): the captioner, and nothing else."""

import mlflow

from fashioncap.serving import Captioner

mlflow.models.set_model(Captioner())
