"""MLflow "models from code" entry: MLflow runs this file to build the pyfunc model.

Logged beside the model instead of a pickle (``register`` passes this file's path as
``python_model``), so loading a registered model unpickles nothing: it imports
``fashiondiff.serving.pyfunc`` (shipped in the model's ``code/``) and calls ``set_model``.
"""

from mlflow.models import set_model

from fashiondiff.serving.pyfunc import KandinskyModel

set_model(KandinskyModel())
