"""The har.v1 gRPC model server: servicer, batching, interceptors and assembly (`har-serve`).

Importing this package is cheap: JAX is imported only when a model is loaded.
"""
