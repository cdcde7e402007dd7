"""har-flax: human action recognition with a Flax CNN-LSTM, served over gRPC.

Importing this package is cheap and pulls in no JAX: the web UI imports the generated protobuf
modules from here on machines without the model.
"""

__version__ = "0.1.0"
