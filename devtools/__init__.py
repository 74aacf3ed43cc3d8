"""Tooling that lives beside the package, never inside the wheel, and that the worker never
imports: real local services (a Kafka broker, Prometheus), the quickstart, the demonstration
model's training and synthetic spectra, its accuracy report, and an independent port of the SDSS
pipeline loop that tests and benchmarks check the engine against."""
