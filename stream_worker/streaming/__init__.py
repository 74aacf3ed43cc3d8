"""The Kafka worker: one batch's processing, the checkpoint (publish and commit), the Kafka
clients, metrics and health, and the loop that runs them."""
