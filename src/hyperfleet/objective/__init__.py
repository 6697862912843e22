"""The user's objective in its other forms: a command line run as the objective, the refit run
after a search, and what a Python objective calls to continue an interrupted trial.

(A training script run by ``--cmd`` talks to hyperfleet through :mod:`hyperfleet.client`,
which stays at the top of the package so that ``from hyperfleet import client`` works.)
"""
