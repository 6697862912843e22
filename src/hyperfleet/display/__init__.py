"""What the run shows: the run's state as the controller keeps it, the events it emits, the live
terminal view, and the files that let others follow it.

``render`` is a pure function of a :class:`~hyperfleet.display.runstate.RunState`, so tests
draw a hand-built state; the sinks here only decide when to draw or write.
"""
