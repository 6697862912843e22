"""What suggests parameters: the search space, the samplers and pruners by name, the automatic
sampler, and the sampler wrapper that lets a trial be sampled before a worker asks for it.

Plain Optuna extensions: nothing here knows about slots, workers or the run folder.
"""
