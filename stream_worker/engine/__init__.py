"""The engine: the network and its weights, preprocessing, the precision plan, the fused kernels
and the :class:`~stream_worker.engine.estimator.Estimator` that turns flux and ivar into
per-spectrum estimates."""
