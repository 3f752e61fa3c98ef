import pytest

from distspatial import NodeConfig


def test_defaults_and_builders():
    cfg = NodeConfig()
    assert cfg.node_count == 4 and cfg.replication_factor == 1 and cfg.curve == "hilbert"
    c2 = cfg.with_node_count(3).with_fault_tolerance(True).with_load_balancing(True).with_compression(True)
    assert (c2.node_count, c2.replication_factor, c2.fault_tolerance, c2.load_balancing, c2.compression) == (
        3, 2, True, True, True)
    assert cfg.node_count == 4, "builders must not mutate the original"
    assert c2.with_fault_tolerance(False).replication_factor == 1
    assert NodeConfig().with_node_count(1).with_fault_tolerance(True).replication_factor == 1
    assert NodeConfig().with_address("auto").address == "auto"
    assert NodeConfig().with_curve("morton").curve == "morton"
    assert NodeConfig(node_count=2, partitions_per_node=3).partition_count == 6
    assert NodeConfig().with_replication_factor(3).replication_factor == 3
    assert NodeConfig(replication_factor=3).with_node_count(2).replication_factor == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"node_count": 0}, "node_count"),
        ({"node_count": 2.5}, "node_count"),
        ({"partitions_per_node": 0}, "partitions_per_node"),
        ({"replication_factor": 5}, "replication_factor"),
        ({"replication_factor": 0}, "replication_factor"),
        ({"max_retries": -1}, "max_retries"),
        ({"communication_timeout_ms": 0}, "communication_timeout_ms"),
        ({"heartbeat_interval_ms": -5}, "heartbeat_interval_ms"),
        ({"curve": "peano"}, "curve"),
        ({"address": ""}, "address"),
        ({"cpus_per_node": 0}, "cpus_per_node"),
        ({"fault_tolerance": "yes"}, "fault_tolerance"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NodeConfig(**kwargs)


def test_builder_errors():
    with pytest.raises(ValueError, match=r"node_count must be in \[1, 4096\]"):
        NodeConfig().with_node_count(0)
    with pytest.raises(ValueError, match="curve"):
        NodeConfig().with_curve("zorder")
    with pytest.raises(ValueError, match="fault_tolerance"):
        NodeConfig().with_fault_tolerance("on")
