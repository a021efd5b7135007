"""The synthetic speech corpus (espeak-ng): see ``downstreams.synth.corpus`` for the public API.

Kept import-free on purpose: worker processes import this package and must stay light.
"""
