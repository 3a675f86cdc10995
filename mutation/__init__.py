"""Mutation testing of the reference against the golden cases (docs: mutation/README.md).

session.py makes the mutants with cosmic-ray and runs `adalora-ref conform` on each; report.py
scores them per module and lists the survivors with their class from survivors.toml.
"""
