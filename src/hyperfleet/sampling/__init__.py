"""What suggests parameters: the search space, the samplers and pruners by name, the automatic
sampler, the sampler wrapper that lets a trial be sampled before a worker asks for it, and TPE's
sampler processes (``replica``: a study's replica sampling ahead; ``replica_process``: starting
one and talking to it, from the controller or an agent's node).

Plain Optuna extensions: nothing here knows about slots, workers or the run folder.
"""
