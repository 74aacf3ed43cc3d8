"""The three-node cluster fails over as a production one does.

Failover tests build on LocalKafkaCluster, so this checks what they rely on: three brokers
replicating every partition with min.insync.replicas 2, leadership moving off a killed broker while
acks=all writes still succeed, a new active controller when the old one dies, coordinators that
are nodes of the cluster, and a killed node rejoining until every replica is back in sync.
"""

from __future__ import annotations

from contextlib import closing

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from tests.services import unique_topic
from tests.streaming import wait_until
from tests.test_local_services import consume, group_consumer, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = {1, 2, 3}


def partitions(bootstrap: str, topic: str) -> dict[int, dict]:
    with closing(KafkaAdminClient(bootstrap_servers=bootstrap)) as admin:
        (described,) = admin.describe_topics([topic])
    return {p["partition_index"]: p for p in described["partitions"]}


def test_three_brokers_replicate_every_partition_and_coordinate(healthy_cluster):
    cluster = healthy_cluster
    topic, group, transactional_id = unique_topic("replicated"), unique_topic("group"), unique_topic("txn")
    cluster.create_topic(topic, 3)

    with closing(KafkaAdminClient(bootstrap_servers=cluster.bootstrap)) as admin:
        assert {b["broker_id"] for b in admin.describe_cluster()["brokers"]} == NODES
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, ["min.insync.replicas"])],
                                         config_filter="all")
    assert configs["topic"][topic]["min.insync.replicas"]["value"] == "2"
    for partition in partitions(cluster.bootstrap, topic).values():
        assert set(partition["replica_nodes"]) == set(partition["isr_nodes"]) == NODES
        assert cluster.leader(topic, partition["partition_index"]) == partition["leader_id"]

    assert cluster.controller() in NODES
    assert cluster.group_coordinator(group) in NODES
    with closing(KafkaProducer(bootstrap_servers=cluster.bootstrap, transactional_id=transactional_id)) as producer:
        producer.init_transactions()
        assert cluster.transaction_coordinator(transactional_id) in NODES


def test_killing_a_partition_leader_moves_leadership_and_acks_all_still_succeed(healthy_cluster):
    cluster = healthy_cluster
    topic, group = unique_topic("failover"), unique_topic("group")
    cluster.create_topic(topic, 1)
    produce(cluster.bootstrap, topic, [b"before"])
    killed = cluster.leader(topic, 0)

    cluster.kill(killed)
    wait_until(lambda: cluster.leader(topic, 0) not in (killed, -1), 60, "a new leader")
    assert set(partitions(cluster.bootstrap, topic)[0]["isr_nodes"]) == NODES - {killed}
    produce(cluster.bootstrap, topic, [b"after"])  # acks=all: 2 replicas in sync are enough
    with closing(group_consumer(cluster.bootstrap, topic, group)) as consumer:
        assert consume(consumer, 2) == [b"before", b"after"]

    cluster.start_node(killed)
    cluster.wait_in_sync()
    assert set(partitions(cluster.bootstrap, topic)[0]["isr_nodes"]) == NODES


def test_killing_the_active_controller_elects_another(healthy_cluster):
    cluster = healthy_cluster
    killed = cluster.controller()

    cluster.kill(killed)
    wait_until(lambda: cluster.controller() != killed, 60, "a new quorum leader")
    assert cluster.controller() in NODES - {killed}

    cluster.start_node(killed)
    cluster.wait_in_sync()
