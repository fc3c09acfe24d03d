"""The benchmark scenarios of flask-pgevents, one module each, and what they share (:mod:`.common`).

Each scenario module has one ``scenario_<name>(server, settings)`` function
returning a :class:`~.common.ScenarioResult`; its docstring is the
scenario's description in the results JSON. ``benchmarks/run.py`` runs them.
"""
