"""bitwise-nn core library: data, input binarizers, the two networks of Kim & Smaragdis (2016), their
Lightning modules, the packed-bit inference engine and the cost model. No Hydra, MLflow or fixed paths.
"""

from bnn_core.errors import BnnError, ConfigError, DataError, ModelFileError, TrainingDivergedError

__all__ = ["BnnError", "ConfigError", "DataError", "ModelFileError", "TrainingDivergedError"]
