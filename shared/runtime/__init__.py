"""The Redis Streams runtime every service uses: bus, producer, consumer, leases."""

from shared.runtime.bus import Bus, backoff_delay, connect, is_redis_down, retry_redis
from shared.runtime.consumer import Consumer, Delivery, Retryable, default_consumer_name, ensure_group
from shared.runtime.leases import Lease, LeaseKeeper
from shared.runtime.producer import FIELD, Producer

__all__ = [
    "FIELD",
    "Bus",
    "Consumer",
    "Delivery",
    "Lease",
    "LeaseKeeper",
    "Producer",
    "Retryable",
    "backoff_delay",
    "connect",
    "default_consumer_name",
    "ensure_group",
    "is_redis_down",
    "retry_redis",
]
