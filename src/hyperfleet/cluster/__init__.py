"""Many machines: one controller, one agent per node, over one authenticated connection each.

The controller stays the only writer of the storage and keeps the study, the sampler and the
fair-share pool. Each node runs ``hyperfleet agent``, which finds its GPUs and cores with the
same inventory code as a single machine, starts the same warm pinned workers for the slots the
controller plans for it, and relays their messages (:mod:`hyperfleet.cluster.agent`). On the
controller, each remote worker looks like a local one: the loop waits on the node's connection
and puts each message in the worker's inbox, which it drains as a local worker's connection
(:mod:`hyperfleet.cluster.hub`). When a node's connection closes or its heartbeats stop, its
workers' inboxes end and the loop ends their trials as ``lost``.
"""
