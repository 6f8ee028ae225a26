"""The registered model's code file ("models from code"): MLflow copies this file into the
model's `code/` folder and runs it at load time, and the class it names is imported from the
installed package. So loading a registered model unpickles nothing; the checkpoint it reads is
weights-only (`VideoLightsPyfunc.load_context`).
"""

import mlflow.models

from vl.serving import VideoLightsPyfunc

mlflow.models.set_model(VideoLightsPyfunc())
