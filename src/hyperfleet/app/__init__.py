"""The entry points, on top of everything: ``hyperfleet.optimize`` (:mod:`~hyperfleet.app.api`),
the ``hyperfleet`` command (:mod:`~hyperfleet.app.cli`), the search they share from start to end
(:mod:`~hyperfleet.app.search`), a campaign turned into a search
(:mod:`~hyperfleet.app.campaign_search`) and ``hyperfleet status`` (:mod:`~hyperfleet.app.status`).
"""
