"""Real local services (a Kafka broker, a Prometheus server) for tests and the quickstart.

There is no Docker on the machines this project targets, so the services run as plain child
processes: Kafka from Maven Central jars, Prometheus from the Debian package.
"""
