"""What a run leaves on disk and reads back: the storage, the run folder and the stored trials.

Below everything that runs a search: the controller writes through these modules, and the
reports and ``hyperfleet status`` read through them without importing the controller.
"""
