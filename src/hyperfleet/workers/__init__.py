"""The worker processes and their contract with the controller: the messages and byte markers
they exchange (:mod:`~hyperfleet.workers.protocol`), the :class:`~hyperfleet.workers.handle.Worker`
protocol and the local worker's handle (:mod:`~hyperfleet.workers.handle`), and the worker's own
side (:mod:`~hyperfleet.workers.main`, :mod:`~hyperfleet.workers.runner`)."""
