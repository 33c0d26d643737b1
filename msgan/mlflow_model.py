"""MLflow models-from-code entry point: the pyfunc that wraps a cascade (logged by msgan.registry)."""

from mlflow.models import set_model

from msgan.registry import CascadeModel

set_model(CascadeModel())
