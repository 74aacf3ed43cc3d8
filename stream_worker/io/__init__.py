"""Bytes and files at the edges: the Kafka wire format, apStar files, referenced files and the
output serializers. Nothing here imports torch, so a producer needs none."""
