"""bitwise-nn core library: data, input binarizers, the two networks of Kim & Smaragdis (2016), their
Lightning modules, the packed-bit inference engine, the exported model file and the cost model.
No Hydra, MLflow or fixed paths.

Deploying a trained model takes one import::

    from bnn_core import load_bitwise_model
    model = load_bitwise_model("models/bnn.npz")
    classes = model.predict(pixels_uint8)        # [n, 784] raw 0..255 pixels in
"""

from bnn_core.bitwise_model import BitwiseModel
from bnn_core.errors import BnnError, ConfigError, DataError, ModelFileError, TrainingDivergedError
from bnn_core.model_file import load_bitwise_model, save_bitwise_model

__all__ = [
    "BitwiseModel",
    "BnnError",
    "ConfigError",
    "DataError",
    "ModelFileError",
    "TrainingDivergedError",
    "load_bitwise_model",
    "save_bitwise_model",
]
