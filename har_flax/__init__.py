"""har-flax: human action recognition with a Flax CNN-LSTM, served over gRPC.

Importing this package is cheap and pulls in no JAX: the web UI imports the generated protobuf
modules from here on machines without the model. Using it from Python (train, evaluate,
classify): docs/PYTHON.md; ``har_flax.train.fit``, ``har_flax.evaluate.evaluate`` and
``har_flax.predictor.Predictor`` are where to start.
"""

__version__ = "0.1.0"
