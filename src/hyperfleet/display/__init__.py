"""What the run shows: the live terminal view, and the files that let others follow it.

``render`` is a pure function of a :class:`~hyperfleet.state.RunState`, so tests draw a
hand-built state; the sinks here only decide when to draw or write.
"""
